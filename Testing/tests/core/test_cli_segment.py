"""``relseg segment`` end to end: outputs, progress lines, batch resume, bad inputs without tracebacks."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from test_inference import save_tiny_model

from relsegcore.cli import main
from relsegcore.demo import make_demo_ct

OUTPUT_SUFFIXES = (".seg.nrrd", "_lungs.nii.gz", "_infection.nii.gz", "_report.json", "_overview.png")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "chest.nii.gz"
    sitk.WriteImage(make_demo_ct(shape=(32, 128, 128), spacing=(2.8, 2.8, 8.0)).image, str(path))
    return path


def segment(*args: str | Path, model: Path) -> int:
    return main(["segment", *map(str, args), "--model", str(model), "--device", "cpu", "--progress", "none"])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_one_ct_file_writes_every_output_and_prints_the_numbers(ct_file, model_path, tmp_path, capsys):
    assert segment(ct_file, "--out", tmp_path / "out", model=model_path) == 0
    assert files_in(tmp_path / "out") == sorted(f"chest{suffix}" for suffix in OUTPUT_SUFFIXES)
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "chest.seg.nrrd") in printed
    assert re.search(r"Lungs: +left \d+ mL, right \d+ mL, total \d+ mL", printed)
    assert re.search(r"Infection: [\d.]+ mL, [\d.]+ % of lung volume", printed)
    assert "tiny-test-model 0.0.1 on cpu" in printed
    assert "Warning" not in printed  # a whole synthetic chest: nothing to warn about


def test_a_scan_of_the_lung_bases_only_warns_that_the_percentages_are_not_the_whole_lungs(
        shared_data, model_path, tmp_path, capsys):
    """A real upper-abdomen DICOM series (1 mL of right lung base): the numbers come with both warnings."""
    series = shared_data / "ct-fixtures" / "totalsegmentator-example" / "dicom"
    assert segment(series, "--out", tmp_path, model=model_path) == 0
    printed = capsys.readouterr().out
    assert "DICOM series: CT Body 3.0 (20 files)" in printed  # no placeholder for the missing number and UID
    warnings = [line for line in printed.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 2
    assert "No left lung was found" in warnings[0] and "may not cover the whole chest" in warnings[1]
    report = json.loads((tmp_path / "dicom_report.json").read_text())
    assert report["warnings"] == [line.removeprefix("Warning: ") for line in warnings]


def test_progress_lines_for_the_slicer_module(ct_file, model_path, tmp_path, capsys):
    code = main(["segment", str(ct_file), "--out", str(tmp_path), "--model", str(model_path), "--device", "cpu",
                 "--progress", "lines"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROGRESS")]
    assert all(re.fullmatch(r"PROGRESS [01]\.\d{4} \S.*", line) for line in lines), lines
    fractions = [float(line.split()[1]) for line in lines]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = list(dict.fromkeys(line.split(maxsplit=2)[2] for line in lines))
    assert stages == ["Reading", "Lungs", "Infection", "Report"]


def test_demo_prints_synthetic_dice(model_path, tmp_path, capsys):
    assert main(["segment", "--demo", "--out", str(tmp_path), "--model", str(model_path), "--device", "cpu",
                 "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "Synthetic demo (known masks, not clinical data)" in printed
    lung_dice = float(re.search(r"lung Dice +([\d.]+)", printed).group(1))
    assert lung_dice > 0.95  # the lung segmenter is not a random model: it must find the demo's lungs
    assert re.search(r"infection Dice +[\d.]+", printed)
    assert files_in(tmp_path) == sorted(f"demo{suffix}" for suffix in OUTPUT_SUFFIXES)


def write_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input and a phrase its one-line error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[Path, str]] = {}

    corrupt = folder / "corrupt.nii.gz"
    corrupt.write_bytes(os.urandom(2000))
    cases["corrupt file"] = (corrupt, "damaged")

    good = make_demo_ct(shape=(16, 64, 64), spacing=(5.6, 5.6, 16.0)).image
    truncated = folder / "truncated.nrrd"
    sitk.WriteImage(good, str(truncated), useCompression=False)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    cases["truncated file"] = (truncated, "damaged")

    png = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png)
    cases["RGB PNG"] = (png, "Unsupported file type")

    rgb = folder / "rgb.mha"
    sitk.WriteImage(sitk.Compose([sitk.Cast(good, sitk.sitkInt16)] * 3), str(rgb))
    cases["RGB volume"] = (rgb, "values per voxel")

    flat = folder / "slice.nrrd"
    sitk.WriteImage(good[:, :, 8], str(flat))
    cases["2D image"] = (flat, "2D")

    series4d = folder / "series4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([good, good]), str(series4d))
    cases["4D series"] = (series4d, "4D")

    with_nan = sitk.Cast(good, sitk.sitkFloat32)
    with_nan[5, 5, 5] = float("nan")
    nan_file = folder / "nan.mha"
    sitk.WriteImage(with_nan, str(nan_file))
    cases["NaN voxels"] = (nan_file, "NaN")

    mr_like = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 900, (16, 64, 64)).astype(np.int16))
    mr_file = folder / "mr.nrrd"
    sitk.WriteImage(mr_like, str(mr_file))
    cases["MR-like intensities"] = (mr_file, "no air")

    absurd = sitk.Image(good)
    absurd.SetSpacing((0.7, 0.7, 250.0))
    absurd_file = folder / "spacing.nrrd"
    sitk.WriteImage(absurd, str(absurd_file))
    cases["absurd spacing"] = (absurd_file, "spacing")

    empty = folder / "empty_folder"
    empty.mkdir()
    cases["empty folder"] = (empty, "empty")

    cases["missing file"] = (folder / "nowhere.nii.gz", "not found")
    return cases


BAD_INPUTS = ["corrupt file", "truncated file", "RGB PNG", "RGB volume", "2D image", "4D series", "NaN voxels",
              "MR-like intensities", "absurd spacing", "empty folder", "missing file"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_gives_one_line_exit_2_and_no_files(kind, bad_inputs, model_path, tmp_path, capsys):
    path, phrase = bad_inputs[kind]
    out = tmp_path / "out"
    assert segment(path, "--out", out, model=model_path) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("relseg: error: ") and len(stderr.splitlines()) == 1, stderr
    assert phrase.lower() in stderr.lower(), stderr
    assert files_in(out) == []


def test_unknown_model_and_missing_input_are_one_line_errors(ct_file, tmp_path, capsys):
    assert main(["segment", str(ct_file), "--out", str(tmp_path), "--model", "no-such-model",
                 "--progress", "none"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["segment", "--out", str(tmp_path)]) == 2
    assert "Give either an INPUT or --demo" in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_the_installed_command_prints_no_traceback(bad_inputs, model_path, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "relsegcore.cli", "segment", str(bad_inputs["corrupt file"][0]), "--out",
         str(tmp_path / "out"), "--model", str(model_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and completed.stderr.startswith("relseg: error: ")
    assert not (tmp_path / "out").exists()


def test_a_console_that_cannot_show_a_path_still_gets_the_run_and_its_summary(ct_file, model_path, tmp_path):
    """A result folder named in another script, printed to a console in an ASCII (or ANSI) code page: the path
    is escaped in the printout; the run is not lost to a UnicodeEncodeError after its files were written."""
    out = tmp_path / "Zürich 张伟"
    completed = subprocess.run(
        [sys.executable, "-m", "relsegcore.cli", "segment", str(ct_file), "--out", str(out), "--model",
         str(model_path), "--device", "cpu", "--progress", "none"],
        capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    assert completed.returncode == 0, completed.stderr.decode("ascii", "replace")
    assert files_in(out) == sorted(f"chest{suffix}" for suffix in OUTPUT_SUFFIXES)
    assert "Z\\xfcrich \\u5f20\\u4f1f" in completed.stdout.decode("ascii")


def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(ct_file, model_path, tmp_path, capsys,
                                                                          monkeypatch):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file where the folder should go")
    import relsegcore.pipeline as pipeline

    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: pytest.fail("segmented although nothing can be written"))
    for out in (in_the_way, in_the_way / "case1"):
        assert segment(ct_file, "--out", out, model=model_path) == 2
        error = capsys.readouterr().err
        assert error == f"relseg: error: cannot write results to {out}: {in_the_way} is a file, not a folder\n"


def test_a_full_disk_while_writing_is_one_line_naming_the_file(ct_file, model_path, tmp_path, capsys, monkeypatch):
    import errno

    import relsegcore.outputs as outputs

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "chest.seg.nrrd"))

    monkeypatch.setattr(outputs, "_write_seg_nrrd", no_space)
    assert segment(ct_file, "--out", tmp_path / "out", model=model_path) == 2
    error = capsys.readouterr().err
    assert error == f"relseg: error: No space left on device: {tmp_path / 'out' / 'chest.seg.nrrd'}\n"
    assert files_in(tmp_path / "out") == []  # none of the five outputs, not even the ones that were written


def test_training_and_evaluation_outputs_are_checked_before_the_work(tmp_path, capsys):
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("a file")
    commands = (["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--out", str(in_the_way / "run")],
                ["evaluate", "--data", f"ctseg2d:{tmp_path}", "--json", str(in_the_way / "scores.json")])
    for command in commands:
        assert main(command) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"relseg: error: cannot write results to {in_the_way}")
        assert error.endswith(f"{in_the_way} is a file, not a folder\n")


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_batch_folder_skips_a_bad_case_and_resumes(ct_file, model_path, bad_inputs, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (cases / name).write_bytes(ct_file.read_bytes())
    (cases / "broken.nii.gz").write_bytes(bad_inputs["corrupt file"][0].read_bytes())
    out = tmp_path / "out"

    assert segment(cases, "--out", out, model=model_path) == 1  # a failed case makes the batch exit 1
    summary = read_summary(out)
    assert {name: row["status"] for name, row in summary.items()} == {"a": "done", "b": "done", "broken": "failed"}
    assert "damaged" in summary["broken"]["error"]
    assert float(summary["a"]["lungs.total_ml"]) > 0 and summary["a"]["model.name"] == "tiny-test-model"
    assert not any(name.startswith("broken") for name in files_in(out))
    assert "2 of 3 cases segmented" in capsys.readouterr().out

    report_time = (out / "a_report.json").stat().st_mtime_ns
    assert segment(cases, "--out", out, model=model_path) == 1
    summary = read_summary(out)
    assert {name: row["status"] for name, row in summary.items()} == {"a": "skipped", "b": "skipped",
                                                                       "broken": "failed"}
    assert (out / "a_report.json").stat().st_mtime_ns == report_time
    assert summary["a"]["lungs.total_ml"]  # skipped cases keep their numbers in the summary

    other_model = save_tiny_model(tmp_path / "other", name="tiny-other", seed=5)
    (out / "b_overview.png").unlink()  # an incomplete case is redone, as is every case of another model
    assert segment(cases, "--out", out, model=other_model) == 1
    assert {name: row["status"] for name, row in read_summary(out).items()} == {"a": "done", "b": "done",
                                                                                 "broken": "failed"}


def test_batch_csv_list_with_names_in_two_worker_processes(ct_file, model_path, tmp_path, capsys):
    listing = tmp_path / "cases.csv"
    listing.write_text(f"path,name\n{ct_file},first\n{ct_file.name},second\n", encoding="utf-8")
    (tmp_path / ct_file.name).write_bytes(ct_file.read_bytes())  # relative paths are read beside the CSV
    out = tmp_path / "out"
    assert segment(listing, "--out", out, "--workers", "2", model=model_path) == 0
    assert {name: row["status"] for name, row in read_summary(out).items()} == {"first": "done", "second": "done"}
    assert (out / "first.seg.nrrd").is_file() and (out / "second_report.json").is_file()


def test_csv_without_path_column_is_refused(tmp_path, model_path, capsys):
    listing = tmp_path / "cases.csv"
    listing.write_text("file\nx.nii.gz\n", encoding="utf-8")
    assert segment(listing, "--out", tmp_path / "out", model=model_path) == 2
    assert "'path' column" in capsys.readouterr().err


def test_outputs_written_beside_the_inputs_are_not_taken_for_cases(ct_file, model_path, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "only.nii.gz").write_bytes(ct_file.read_bytes())
    for out in (cases, cases / "results"):
        assert segment(cases, "--out", out, model=model_path) == 0
        assert segment(cases, "--out", out, model=model_path) == 0
        assert {name: row["status"] for name, row in read_summary(out).items()} == {"only": "skipped"}


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """``image`` as a DICOM CT series, one file per slice, the way a scanner folder looks."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.999"
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series_uid), ("0008|103e", "Demo chest"),
                           ("0020|0011", "3"), ("0020|0013", str(z + 1)), ("0028|1052", "0"), ("0028|1053", "1"),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(image.GetSpacing()[2]))):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)


def test_a_dicom_folder_is_one_case_and_the_series_is_named(ct_file, model_path, tmp_path, capsys):
    write_dicom_series(sitk.ReadImage(str(ct_file)), tmp_path / "CT_SERIES")
    assert segment(tmp_path / "CT_SERIES", "--out", tmp_path / "out", model=model_path) == 0
    printed = capsys.readouterr().out
    assert "DICOM series: Demo chest (number 3" in printed
    assert (tmp_path / "out" / "CT_SERIES_lungs.nii.gz").is_file()
    lungs = sitk.ReadImage(str(tmp_path / "out" / "CT_SERIES_lungs.nii.gz"))
    assert lungs.GetSize() == sitk.ReadImage(str(ct_file)).GetSize()


def test_a_dicom_series_with_a_missing_file_is_one_line_and_writes_nothing(ct_file, model_path, tmp_path, capsys):
    write_dicom_series(sitk.ReadImage(str(ct_file)), tmp_path / "CT_SERIES")
    (tmp_path / "CT_SERIES" / "slice010.dcm").unlink()  # an incomplete transfer
    assert segment(tmp_path / "CT_SERIES", "--out", tmp_path / "out", model=model_path) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("relseg: error: ") and "a slice is missing" in stderr and "Traceback" not in stderr
    assert files_in(tmp_path / "out") == []


def test_a_volume_too_large_for_memory_is_refused_before_any_work(ct_file, model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RELSEG_MAX_VOXELS", "100000")  # stands in for a machine with little memory
    assert segment(ct_file, "--out", tmp_path / "out", model=model_path) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("relseg: error: ") and "voxels" in stderr and "Traceback" not in stderr
    assert files_in(tmp_path / "out") == []


def test_a_folder_of_nifti_cases_or_an_empty_one_prints_no_itk_warning(ct_file, model_path, tmp_path, capfd):
    """Telling a DICOM series from a folder of cases asks GDCM, whose "No Series were found" warning went to
    stderr (C++ level) before every batch run of NIfTI files and before the one-line error for an empty folder."""
    from relsegcore.batch import is_batch_input

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a.nii.gz").write_bytes(ct_file.read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_batch_input(cases) is True and is_batch_input(empty) is False
    assert segment(empty, "--out", tmp_path / "out", model=model_path) == 2
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err and "No Series" not in captured.err
    assert captured.err == f"relseg: error: The folder {empty} is empty.\n"


@pytest.fixture(scope="module")
def windowed_ct(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The small demo CT stored as COVID-19-CT-Seg stores its Radiopaedia cases: grey values 0..255 in the
    window -1250..250 HU; and the HU lungs of the CT in HU."""
    from relsegcore.lungs import segment_lungs

    image = make_demo_ct(shape=(32, 128, 128), spacing=(2.8, 2.8, 8.0)).image
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    grey = sitk.GetImageFromArray(np.round(np.clip((hu + 1250) / 1500, 0, 1) * 255).astype(np.uint8))
    grey.CopyInformation(image)
    path = tmp_path_factory.mktemp("windowed") / "radiopaedia_like.nii.gz"
    sitk.WriteImage(grey, str(path))
    return path, sitk.GetArrayFromImage(segment_lungs(image))


def test_a_ct_stored_as_grey_values_is_refused_with_the_way_to_read_it(windowed_ct, model_path, tmp_path, capsys):
    path, _ = windowed_ct
    assert segment(path, "--out", tmp_path / "out", model=model_path) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and "--stored-window=-1250,250" in stderr, stderr
    assert files_in(tmp_path / "out") == []


def test_stored_window_maps_grey_values_back_to_hu(windowed_ct, model_path, tmp_path, capsys):
    path, hu_lungs = windowed_ct
    out = tmp_path / "out"
    assert segment(path, "--out", out, "--stored-window=-1250,250", model=model_path) == 0
    report = json.loads((out / "radiopaedia_like_report.json").read_text())
    assert report["stored_window_hu"] == [-1250.0, 250.0]
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "radiopaedia_like_lungs.nii.gz")))
    for side in (1, 2):  # the lungs of the CT in HU, within the window's 6 HU grey steps
        overlap = 2 * ((lungs == side) & (hu_lungs == side)).sum() / ((lungs == side).sum() + (hu_lungs == side).sum())
        assert overlap >= 0.98, side


def test_stored_window_is_part_of_a_batchs_resume_key(windowed_ct, ct_file, model_path, tmp_path, capsys):
    path, _ = windowed_ct
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    (cases / path.name).write_bytes(path.read_bytes())
    assert segment(cases, "--out", out, "--stored-window=-1250,250", model=model_path) == 0
    assert segment(cases, "--out", out, "--stored-window=-1250,250", model=model_path) == 0
    assert read_summary(out)["radiopaedia_like"]["status"] == "skipped"
    assert segment(cases, "--out", out, "--stored-window=-1000,400", model=model_path) == 0  # read otherwise
    summary = read_summary(out)["radiopaedia_like"]
    assert summary["status"] == "done" and json.loads(summary["stored_window_hu"]) == [-1000.0, 400.0]


@pytest.mark.parametrize(("window", "phrase"), [("250,-1250", "LOW must be below HIGH"),
                                                ("-1250", "expects LOW,HIGH"),
                                                ("-1250,250", "not grey values 0..255")])
def test_a_wrong_stored_window_is_one_line(ct_file, model_path, tmp_path, capsys, window, phrase):
    assert segment(ct_file, "--out", tmp_path / "out", f"--stored-window={window}", model=model_path) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and phrase in stderr, stderr
    assert files_in(tmp_path / "out") == []
