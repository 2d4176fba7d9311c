"""Reading and validating CT input, DICOM series choice, and the canonical-orientation round trip."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from relsegcore import imageio
from relsegcore.errors import InputError


def ct_like(shape_zyx=(6, 32, 32), spacing=(0.7, 0.7, 5.0), seed=0) -> sitk.Image:
    """A small volume with air around a soft-tissue block: passes the CT checks."""
    rng = np.random.default_rng(seed)
    array = np.full(shape_zyx, -1000, np.int16)
    z, y, x = shape_zyx
    array[:, y // 4 : 3 * y // 4, x // 4 : 3 * x // 4] = 40
    array += rng.integers(-20, 20, shape_zyx, dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


# --- reading -------------------------------------------------------------------------------


def test_reads_nifti_file(tmp_path):
    image = ct_like()
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    read = imageio.read_image(path)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert np.allclose(read.GetSpacing(), image.GetSpacing())
    assert imageio.last_series_choice is None


def test_missing_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        imageio.read_image(tmp_path / "nowhere.nii.gz")


def test_unsupported_extension_is_input_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(InputError, match="Unsupported file type"):
        imageio.read_image(path)


def test_corrupt_file_is_input_error(tmp_path):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(InputError, match="damaged"):
        imageio.read_image(path)


def test_truncated_nifti_is_input_error(tmp_path):
    path = tmp_path / "cut.nii.gz"
    sitk.WriteImage(ct_like(shape_zyx=(20, 64, 64)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        imageio.read_image(path)


def test_nifti_in_two_gzip_members_is_whole(tmp_path):
    """The trailer of the last member states only that member's size: the bytes are counted instead."""
    image = ct_like(shape_zyx=(20, 64, 64))
    with gzip.open(_write(tmp_path / "one.nii.gz", image)) as handle:
        data = handle.read()
    path = tmp_path / "two.nii.gz"
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert imageio._gzip_stated_size(path) != len(data)
    read = imageio.read_image(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:len(data) // 2]))
    with pytest.raises(InputError, match="truncated"):
        imageio.read_image(path)


def test_truncated_uncompressed_nifti_is_input_error(tmp_path):
    path = tmp_path / "cut.nii"
    with gzip.open(_write(tmp_path / "full.nii.gz", ct_like(shape_zyx=(20, 64, 64)))) as handle:
        data = handle.read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        imageio.read_image(path)


def test_empty_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match="empty"):
        imageio.read_image(tmp_path)


def test_folder_without_dicom_is_input_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="No DICOM series"):
        imageio.read_image(tmp_path)


# --- DICOM series choice -----------------------------------------------------------------


def write_dicom_series(folder: Path, image: sitk.Image, uid: str, description: str, number: str) -> None:
    """One CT series as single-slice DICOM files (SimpleITK's writer, tags set explicitly)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {
            "0008|0060": "CT",
            "0010|0010": "Synthetic^Test",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0011": number,
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{value:.4f}" for value in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{uid}.{index + 1}",
            "0028|1053": "1",
            "0028|1052": "0",
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{number}_{index:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.fixture()
def two_series_folder(tmp_path) -> tuple[Path, str, str]:
    large_uid, small_uid = "1.2.826.0.1.3680043.2.1125.10", "1.2.826.0.1.3680043.2.1125.20"
    folder = tmp_path / "dicom"
    write_dicom_series(folder, ct_like(shape_zyx=(5, 16, 16), seed=1), large_uid, "Lung 1mm", "3")
    write_dicom_series(folder, ct_like(shape_zyx=(3, 16, 16), seed=2), small_uid, "Scout", "7")
    return folder, large_uid, small_uid


def test_dicom_folder_with_two_series_picks_the_largest(two_series_folder, caplog):
    folder, large_uid, _ = two_series_folder
    with caplog.at_level(logging.INFO, logger="relsegcore.imageio"):
        image = imageio.read_image(folder)
    assert image.GetSize() == (16, 16, 5)
    assert imageio.last_series_choice.uid == large_uid
    assert large_uid in caplog.text


@pytest.mark.parametrize("selector", ["uid", "description", "number"])
def test_dicom_series_argument_selects_that_series(two_series_folder, selector):
    folder, _, small_uid = two_series_folder
    wanted = {"uid": small_uid, "description": "Scout", "number": "7"}[selector]
    image = imageio.read_image(folder, series=wanted)
    assert image.GetSize() == (16, 16, 3)
    assert imageio.last_series_choice.uid == small_uid
    expected = sitk.GetArrayFromImage(ct_like(shape_zyx=(3, 16, 16), seed=2))
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


def test_unknown_series_is_input_error_listing_the_offer(two_series_folder):
    folder, large_uid, _ = two_series_folder
    with pytest.raises(InputError, match=large_uid.replace(".", r"\.")):
        imageio.read_image(folder, series="1.2.3.999")


def test_real_compressed_dicom_series(shared_data):
    folder = shared_data / "ct-fixtures" / "totalsegmentator-example" / "dicom"
    image = imageio.read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    imageio.validate_ct(image)


@pytest.fixture()
def dicom_stack(tmp_path) -> Path:
    folder = tmp_path / "stack"
    write_dicom_series(folder, ct_like(shape_zyx=(8, 16, 16), spacing=(0.7, 0.7, 2.5), seed=3),
                       "1.2.826.0.1.3680043.2.1125.30", "Chest", "2")
    return folder


def test_evenly_spaced_dicom_series_reads_with_its_spacing_and_no_itk_warning(dicom_stack, capfd):
    image = imageio.read_image(dicom_stack)
    assert image.GetSize() == (16, 16, 8)
    assert image.GetSpacing()[2] == pytest.approx(2.5)
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_series_with_a_missing_slice_is_refused_naming_the_gap(dicom_stack, capfd):
    """ITK would stack the seven files 2.86 mm apart, shifting everything past the gap and every volume."""
    (dicom_stack / "2_004.dcm").unlink()
    gap = r"5\.00 mm between slices 4 and 5 of 7 .* 2\.50 mm apart \(a slice is missing"
    with pytest.raises(InputError, match=gap):
        imageio.read_image(dicom_stack)
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_series_with_a_slice_twice_is_refused(dicom_stack, tmp_path):
    image = ct_like(shape_zyx=(1, 16, 16), spacing=(0.7, 0.7, 2.5), seed=4)
    image.SetOrigin((0.0, 0.0, 2.5 * 3))  # a second file at the fourth slice's position
    write_dicom_series(tmp_path / "extra", image, "1.2.826.0.1.3680043.2.1125.30", "Chest", "9")
    (tmp_path / "extra" / "9_000.dcm").rename(dicom_stack / "9_000.dcm")
    with pytest.raises(InputError, match="unevenly spaced slices.*duplicate slices"):
        imageio.read_image(dicom_stack)


def test_positions_rounded_to_a_tenth_of_a_millimetre_are_even(tmp_path):
    """0.625 mm slices whose positions are stored to 0.1 mm alternate 0.6 / 0.7 mm apart: not a gap."""
    positions = [f"0\\0\\{round(index * 0.625, 1)}" for index in range(12)]
    imageio.check_even_slices(positions, ["1\\0\\0\\0\\1\\0"] * 12, tmp_path)
    shuffled = positions[:5] + positions[6:7] + positions[5:6] + positions[7:]
    with pytest.raises(InputError, match="could not be put in slice order"):
        imageio.check_even_slices(shuffled, ["1\\0\\0\\0\\1\\0"] * 12, tmp_path)
    with pytest.raises(InputError, match="mixes slice orientations"):
        imageio.check_even_slices(positions, ["1\\0\\0\\0\\1\\0"] * 11 + ["1\\0\\0\\0\\0\\1"], tmp_path)


def test_real_dicom_series_with_a_file_missing_is_refused(shared_data, tmp_path):
    source = shared_data / "ct-fixtures" / "totalsegmentator-example" / "dicom"
    files = sorted(source.iterdir())
    assert len(files) == 20
    for file in files[:9] + files[10:]:
        (tmp_path / file.name).symlink_to(file)
    with pytest.raises(InputError, match=r"4\.00 mm between slices .* 2\.00 mm apart \(a slice is missing"):
        imageio.read_image(tmp_path)


# --- validation --------------------------------------------------------------------------


def test_single_slice_ct_is_accepted():
    imageio.validate_ct(ct_like(shape_zyx=(1, 512, 512)))


def test_rgb_png_is_rejected(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(path)
    with pytest.raises(InputError, match="colour"):
        imageio.validate_ct(sitk.ReadImage(str(path)))
    with pytest.raises(InputError, match="Unsupported file type"):
        imageio.read_image(path)


def test_mr_like_range_is_rejected():
    array = np.random.default_rng(0).integers(0, 4000, (4, 32, 32)).astype(np.int16)
    with pytest.raises(InputError, match="no air"):
        imageio.validate_ct(sitk.GetImageFromArray(array))


def test_values_outside_hu_range_are_rejected():
    array = sitk.GetArrayFromImage(ct_like()).astype(np.int32)
    array.reshape(-1)[:: 50] = 30000  # 2 % of the voxels: not metal, a CT not in HU
    with pytest.raises(InputError, match="outside the CT range"):
        imageio.validate_ct(sitk.GetImageFromArray(array))
    array = sitk.GetArrayFromImage(ct_like()).astype(np.int32)
    array[0, 0, 0] = -40000
    with pytest.raises(InputError, match="outside the CT range"):
        imageio.validate_ct(sitk.GetImageFromArray(array))


def test_padding_and_metal_of_real_series_are_accepted():
    """Padding at -3024 outside the scan field and a few metal voxels at 6000 HU are ordinary in real CT."""
    array = sitk.GetArrayFromImage(ct_like()).astype(np.int16)
    array[:, :3, :] = -3024
    array[0, 10, 10:13] = 6000
    imageio.validate_ct(sitk.GetImageFromArray(array))


def test_2d_image_is_rejected():
    with pytest.raises(InputError, match="2D"):
        imageio.validate_ct(ct_like()[:, :, 0])


def test_4d_image_is_rejected():
    volume = ct_like()
    with pytest.raises(InputError, match="4D"):
        imageio.validate_ct(sitk.JoinSeries([volume, volume]))


def test_nan_voxels_are_rejected():
    array = sitk.GetArrayFromImage(ct_like()).astype(np.float32)
    array[2, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        imageio.validate_ct(sitk.GetImageFromArray(array))


@pytest.mark.parametrize("spacing", [(0.01, 0.7, 5.0), (0.7, 0.7, 50.0), (0.7, 0.05, 5.0)])
def test_absurd_spacing_is_rejected(spacing):
    image = ct_like()
    image.SetSpacing(spacing)
    with pytest.raises(InputError, match="spacing"):
        imageio.validate_ct(image)


def test_constant_image_is_rejected():
    array = np.full((4, 16, 16), -1000, np.int16)
    with pytest.raises(InputError, match="empty"):
        imageio.validate_ct(sitk.GetImageFromArray(array))


def test_too_large_volume_is_rejected(monkeypatch):
    monkeypatch.setenv("RELSEG_MAX_VOXELS", "1000")
    with pytest.raises(InputError, match="voxels"):
        imageio.validate_ct(ct_like(shape_zyx=(2, 32, 32)))
    monkeypatch.setenv("RELSEG_MAX_VOXELS", str(2 * 32 * 32))
    imageio.validate_ct(ct_like(shape_zyx=(2, 32, 32)))


# --- canonical orientation ---------------------------------------------------------------


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "left_handed_nifti": np.diag([-1.0, 1.0, 1.0]),
    "permuted_sagittal": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": _rotation(np.array([0.3, -0.2, 1.0]), 17.0) @ np.diag([-1.0, -1.0, 1.0]),
}


def label_image(direction: np.ndarray) -> sitk.Image:
    array = np.random.default_rng(3).integers(0, 3, (5, 7, 9)).astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.0, 30.5, 101.0))
    image.SetDirection(direction.ravel().tolist())
    return image


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_canonical_round_trip_keeps_every_label_at_its_physical_point(name):
    reference = label_image(DIRECTIONS[name])
    canonical = imageio.to_canonical(reference)
    back = imageio.from_canonical(canonical, reference)
    assert back.GetSize() == reference.GetSize()
    assert np.allclose(back.GetOrigin(), reference.GetOrigin())
    assert np.allclose(back.GetSpacing(), reference.GetSpacing())
    assert np.allclose(back.GetDirection(), reference.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    for index in [(0, 0, 0), (8, 6, 4), (3, 2, 1), (8, 0, 4)]:
        point = reference.TransformIndexToPhysicalPoint(index)
        canonical_index = canonical.TransformPhysicalPointToIndex(point)
        assert canonical[canonical_index] == reference[index]


@pytest.mark.parametrize("name", ["lps", "ras", "left_handed_nifti", "permuted_sagittal"])
def test_canonical_arrays_have_anterior_first_and_patient_left_on_larger_x(name):
    canonical = imageio.to_canonical(label_image(DIRECTIONS[name]))
    assert np.allclose(canonical.GetDirection(), np.eye(3).ravel())


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_result_computed_on_canonical_grid_lands_on_the_right_voxels(name):
    """Label the patient's left half (physical x > 0 in LPS) on the canonical grid; check it on the input grid."""
    reference = label_image(DIRECTIONS[name])
    half_extent = (np.array(reference.GetSize()) - 1) * np.array(reference.GetSpacing()) / 2
    reference.SetOrigin(tuple(-DIRECTIONS[name] @ half_extent + 0.3))  # centred near x = 0
    canonical = imageio.to_canonical(reference)
    left_half = np.zeros(sitk.GetArrayViewFromImage(canonical).shape, np.uint8)
    for index in np.ndindex(*left_half.shape):
        left_half[index] = canonical.TransformIndexToPhysicalPoint(index[::-1])[0] > 0
    result = sitk.GetImageFromArray(left_half)
    result.CopyInformation(canonical)
    back = imageio.from_canonical(result, reference)
    assert back.GetSize() == reference.GetSize()
    assert 0 < left_half.sum() < left_half.size  # both halves present, so a flip would show
    for index in np.ndindex(*sitk.GetArrayViewFromImage(reference).shape):
        expected = reference.TransformIndexToPhysicalPoint(index[::-1])[0] > 0
        assert back[index[::-1]] == expected


def _write(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path

