"""CorrectionStore: real files on disk, a writer SIGKILLed mid-write, updates, export, edited slices."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from relsegcore.corrections import CorrectionStore, CorruptCase, case_folder_name
from relsegcore.errors import InputError
from relsegcore.imageio import to_canonical

MODEL = {"name": "covid-infection-2d", "version": "1.0", "sha256": "ab" * 32}


def make_case(shape=(6, 20, 24), direction=None, seed=0):
    """CT (int16 HU), the model's prediction, and a copy of it to be edited; shape is (z, y, x)."""
    rng = np.random.default_rng(seed)
    ct = sitk.GetImageFromArray(rng.integers(-1000, 400, size=shape).astype(np.int16))
    ct.SetSpacing((0.7, 0.7, 2.5))
    ct.SetOrigin((-10.0, 20.0, 30.0))
    if direction is not None:
        ct.SetDirection(direction)
    predicted = np.zeros(shape, np.uint8)
    predicted[1:4, 5:12, 6:14] = 1
    return ct, predicted, predicted.copy()


def as_labels(array, ct):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    return image


def scratch_entries(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_save_reads_back_and_describes_the_edit(tmp_path):
    ct, predicted, corrected = make_case()
    corrected[2, 5:12, 6:10] = 0  # remove 28 voxels on slice 2
    corrected[4, 0:2, 0:3] = 2  # add 6 voxels of label 2 on slice 4
    store = CorrectionStore(tmp_path / "store")
    record = store.save("case 1", ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)

    assert record.edited and record.edited_slices == [2, 4]
    meta = json.loads((record.path / "case.json").read_text())
    assert meta == record.metadata
    assert dt.datetime.fromisoformat(meta["saved"]).utcoffset() == dt.timedelta(0)
    assert meta["model"] == MODEL and meta["changed_voxels"] == 34
    assert meta["voxel_counts"]["original"] == {"1": 168}
    assert meta["voxel_counts"]["corrected"] == {"1": 140, "2": 6}
    assert meta["dice"] == pytest.approx(2 * 140 / (168 + 146))
    assert meta["dice_per_label"] == {"1": pytest.approx(2 * 140 / 308), "2": 0.0}

    again = store.get("case 1")
    again.verify()
    read_ct = again.read_ct()
    assert np.array_equal(sitk.GetArrayFromImage(read_ct), sitk.GetArrayFromImage(ct))
    assert read_ct.GetSpacing() == pytest.approx(ct.GetSpacing())
    assert read_ct.GetOrigin() == pytest.approx(ct.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(again.read_corrected()), corrected)
    assert np.array_equal(sitk.GetArrayFromImage(again.read_original()), predicted)
    assert scratch_entries(store.root) == []


def test_edited_slices_are_counted_on_the_canonical_grid(tmp_path):
    # z axis pointing inferiorly: canonical slice k is stored slice (n - 1 - k).
    ct, predicted, corrected = make_case(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    corrected[1, 5:8, 6:8] = 0
    store = CorrectionStore(tmp_path)
    record = store.save("flipped", ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)
    assert record.edited_slices == [4]

    (case,) = list(store.training_slices())
    canonical_ct = sitk.GetArrayFromImage(to_canonical(ct))
    canonical_predicted = sitk.GetArrayFromImage(to_canonical(as_labels(predicted, ct)))
    assert np.array_equal(case.images, canonical_ct) and case.images.dtype == np.int16
    assert np.array_equal(case.masks[::-1], corrected) and case.masks.dtype == np.uint8
    assert case.edited.tolist() == [(case.masks[k] != canonical_predicted[k]).any() for k in range(6)]
    assert case.edited.tolist() == [False, False, False, False, True, False]
    assert case.model["name"] == MODEL["name"] and case.spacing == pytest.approx((0.7, 0.7, 2.5))


def test_saving_a_case_again_updates_it(tmp_path):
    ct, predicted, corrected = make_case()
    store = CorrectionStore(tmp_path)
    first = store.save("case-a", ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)
    assert not first.edited and first.edited_slices == [] and first.metadata["dice"] == 1.0

    corrected[3] = 1
    second = store.save("case-a", ct, as_labels(corrected, ct), as_labels(predicted, ct), {"name": "other"})
    assert [r.case_id for r in store.list()] == ["case-a"]
    assert second.metadata["revision"] == 2 and second.metadata["created"] == first.metadata["created"]
    assert second.edited_slices == [3] and second.model == {"name": "other", "version": None, "sha256": None}
    assert np.array_equal(sitk.GetArrayFromImage(store.get("case-a").read_corrected()), corrected)
    assert [p.name for p in tmp_path.iterdir()] == ["case-a"]


def test_list_remove_and_missing_cases(tmp_path):
    store = CorrectionStore(tmp_path)
    ct, predicted, corrected = make_case()
    for case_id in ("b", "Patient 1/Series:2", "patient 1/series:2", "a"):
        store.save(case_id, ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)
    assert [r.case_id for r in store.list()] == ["Patient 1/Series:2", "a", "b", "patient 1/series:2"]
    assert case_folder_name("Patient 1/Series:2") != case_folder_name("patient 1/series:2")
    assert all(not r.path.name.startswith(".") and "/" not in r.path.name for r in store.list())

    store.remove("b")
    assert [r.case_id for r in CorrectionStore(tmp_path).list()] == ["Patient 1/Series:2", "a", "patient 1/series:2"]
    with pytest.raises(InputError, match="no correction is stored for case 'b'"):
        store.get("b")
    with pytest.raises(InputError):
        store.remove("b")
    with pytest.raises(InputError):
        store.save("", ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)


def test_two_dimensional_slice_is_stored_as_one_slice_volume(tmp_path):
    image = sitk.GetImageFromArray(np.arange(32 * 40, dtype=np.uint8).reshape(32, 40))
    predicted = np.zeros((32, 40), np.uint8)
    predicted[10:20, 10:20] = 1
    corrected = predicted.copy()
    corrected[10:20, 20:25] = 1
    store = CorrectionStore(tmp_path)
    record = store.save(
        "slice-7", image, sitk.GetImageFromArray(corrected), sitk.GetImageFromArray(predicted), MODEL
    )
    assert record.read_ct().GetSize() == (40, 32, 1) and record.edited_slices == [0]
    (case,) = store.training_slices(["slice-7"])
    assert case.images.shape == (1, 32, 40) and case.images.dtype == np.uint8
    assert np.array_equal(case.images[0], sitk.GetArrayFromImage(image))
    assert np.array_equal(case.masks[0], corrected) and case.edited.tolist() == [True]


def test_real_covid_slice_correction(tmp_path, shared_data):
    folder = shared_data / "covid-semiseg" / "train"
    image = sitk.ReadImage(str(folder / "images" / "3.jpg"), sitk.sitkUInt8)
    truth = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "masks" / "3.png"), sitk.sitkUInt8)) > 0)
    assert truth.sum() > 0
    prediction = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(truth.astype(np.uint8)), [3, 3]))
    record = CorrectionStore(tmp_path).save(
        "semiseg-3", image, sitk.GetImageFromArray(truth.astype(np.uint8)), sitk.GetImageFromArray(prediction), MODEL
    )
    expected = 2 * prediction.sum() / (prediction.sum() + truth.sum())
    assert record.edited and record.metadata["dice"] == pytest.approx(expected) and expected < 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("size", "has size"),
        ("spacing", "spacing"),
        ("float", "non-integer"),
        ("vector", "channels"),
        ("model", "'name'"),
    ],
)
def test_bad_input_is_rejected_without_writing(tmp_path, bad, message):
    ct, predicted, corrected = make_case()
    labels, model = as_labels(corrected, ct), MODEL
    if bad == "size":
        labels = sitk.GetImageFromArray(corrected[:, :, :10])
    elif bad == "spacing":
        labels.SetSpacing((1.0, 1.0, 1.0))
    elif bad == "float":
        labels = as_labels(corrected.astype(np.float32) * 0.5, ct)
    elif bad == "vector":
        labels = sitk.Compose(labels, labels)
    else:
        model = {"version": "1"}
    store = CorrectionStore(tmp_path)
    with pytest.raises(InputError, match=message):
        store.save("x", ct, labels, as_labels(predicted, ct), model)
    assert list(tmp_path.iterdir()) == []


def test_export_to_zip_and_to_another_store(tmp_path):
    store = CorrectionStore(tmp_path / "store")
    for seed, case_id in enumerate(("one", "two")):
        ct, predicted, corrected = make_case(seed=seed)
        corrected[seed] = 1
        store.save(case_id, ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)

    archive_path = store.export(tmp_path / "out" / "corrections.zip")
    with zipfile.ZipFile(archive_path) as archive:
        names = set(archive.namelist())
        index = json.loads(archive.read("corrections.json"))
    files = ("ct.nrrd", "corrected.nrrd", "original.nrrd", "case.json")
    assert {f"{case}/{name}" for case in ("one", "two") for name in files} <= names
    assert [entry["case_id"] for entry in index] == ["one", "two"]
    assert [entry["edited_slices"] for entry in index] == [[0], [1]]

    copy = CorrectionStore(store.export(tmp_path / "copy"))
    assert [r.case_id for r in copy.list()] == ["one", "two"]
    for record in copy.list():
        record.verify()
        original = store.get(record.case_id)
        assert np.array_equal(sitk.GetArrayFromImage(record.read_ct()), sitk.GetArrayFromImage(original.read_ct()))
    with pytest.raises(InputError, match="into itself"):
        store.export(store.root)


def test_damaged_cases_are_skipped_and_detected(tmp_path):
    store = CorrectionStore(tmp_path)
    ct, predicted, corrected = make_case()
    for case_id in ("kept", "truncated", "tampered"):
        store.save(case_id, ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)
    (tmp_path / "truncated" / "ct.nrrd").write_bytes(b"NRRD")
    tampered = tmp_path / "tampered" / "original.nrrd"
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert [r.case_id for r in store.list()] == ["kept", "tampered"]
    store.get("kept").verify()
    with pytest.raises(CorruptCase, match="original.nrrd"):
        store.get("tampered").verify()


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_crash_between_the_two_renames_restores_the_old_case(tmp_path):
    store = CorrectionStore(tmp_path)
    ct, predicted, corrected = make_case()
    store.save("case", ct, as_labels(corrected, ct), as_labels(predicted, ct), MODEL)
    pid = dead_pid()
    # The state a writer killed between "old -> trash" and "new -> final" leaves behind.
    os.rename(tmp_path / "case", tmp_path / f".trash-case-{pid}-0badc0de")
    half_new = tmp_path / f".tmp-case-{pid}-12345678"
    half_new.mkdir()
    (half_new / "ct.nrrd").write_bytes(b"half")

    reopened = CorrectionStore(tmp_path)
    assert scratch_entries(tmp_path) == []
    record = reopened.get("case")
    record.verify()
    assert np.array_equal(sitk.GetArrayFromImage(record.read_corrected()), corrected)


def test_scratch_of_a_live_writer_is_left_alone(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".tmp-case-{writer.pid}-89abcdef"
        live.mkdir()
        CorrectionStore(tmp_path)
        assert live.is_dir()
    finally:
        writer.kill()
        writer.wait()
    CorrectionStore(tmp_path)
    assert not live.exists()


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, SimpleITK as sitk
    from relsegcore.corrections import CorrectionStore

    store = CorrectionStore(sys.argv[1])
    volume = np.random.default_rng(int(sys.argv[2])).integers(-1024, 1024, size=(48, 160, 160)).astype(np.int16)
    print("READY", flush=True)
    for k in range(int(sys.argv[2]) * 1000, 10**9):
        volume[0, 0, 0] = k % 30000
        ct = sitk.GetImageFromArray(volume)
        labels = np.zeros(volume.shape, np.uint8)
        labels[k % 48, 10:100, 10:100] = 1
        corrected = sitk.GetImageFromArray(labels)
        original = sitk.GetImageFromArray(np.zeros(volume.shape, np.uint8))
        store.save(f"case-{k % 3}", ct, corrected, original, {"name": "m", "version": str(k)})
    """
)


def check_case_is_whole(record) -> None:
    """Every file present, checksummed, and all from the same save (same k)."""
    record.verify()
    k = int(record.model["version"])
    assert sitk.GetArrayFromImage(record.read_ct())[0, 0, 0] == k % 30000
    corrected = sitk.GetArrayFromImage(record.read_corrected())
    assert corrected.sum() == 90 * 90 and corrected[k % 48].sum() == 90 * 90
    assert sitk.GetArrayFromImage(record.read_original()).sum() == 0
    assert record.edited_slices == [k % 48]


def wait_for_staging(root, timeout=20.0) -> None:
    """Return as soon as a writer has started staging a case."""
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith(".tmp-") for p in root.iterdir()):
        assert time.monotonic() < deadline, "the writer never started a case"
        time.sleep(0.001)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_writer_killed_mid_write_leaves_only_whole_cases(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "store"
    chance = random.Random(1234)
    crashes_with_leftovers = 0
    seen: set[str] = set()
    for round_number in range(1, 9):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(root), str(round_number)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "READY"
        if round_number % 2:  # at any moment of the write loop
            time.sleep(chance.uniform(0.05, 0.35))
        else:  # shortly after a case starts being written
            wait_for_staging(root)
            time.sleep(chance.uniform(0.0, 0.03))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        crashes_with_leftovers += bool(scratch_entries(root))

        records = CorrectionStore(root).list()
        assert scratch_entries(root) == []
        listed = {r.case_id for r in records}
        assert len(listed) == len(records) <= 3
        assert seen <= listed  # a crash during an update keeps the old case: none ever vanishes
        seen |= listed
        for record in records:
            check_case_is_whole(record)
    assert crashes_with_leftovers >= 4  # the kills really landed mid-write
    assert len(records) >= 1
