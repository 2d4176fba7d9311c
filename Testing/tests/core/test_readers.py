"""Dataset readers on real files written to tmp_path, the general recipe and the real sets (subsets)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from relsegcore.data.general import parse_data_spec, read_dataset_spec, read_general_sets
from relsegcore.data.intensity import FULL_SLICE_CLAHE, window_hu
from relsegcore.data.readers import (
    SliceSet,
    mediastinum_band,
    read_ct_volumes,
    read_decathlon,
    read_image_folder,
    read_patches_npz,
    read_volume_pairs,
)
from relsegcore.errors import InputError, RelSegError


def _chest_picture(transposed: bool = False, frame: int = 0) -> np.ndarray:
    """Two dark lungs left and right of a bright mediastinum (canonical), or one above the other; cropped to the
    chest as a lung-window screenshot is, or, with ``frame`` pixels of black around it, a whole CT slice."""
    picture = np.full((60, 80), 200, np.uint8)
    picture[8:52, 6:34] = 30
    picture[8:52, 46:74] = 30
    return np.pad(picture.T if transposed else picture, frame)


def _write_folder(root: Path, count: int = 3, transposed: bool = False, mask_dir: str = "masks",
                  frame: int = 0) -> None:
    """``count`` chest pictures with a lesion mask at rows 10:20, columns 30:40 as stored."""
    (root / "images").mkdir(parents=True)
    (root / mask_dir).mkdir()
    picture = _chest_picture(transposed, frame)
    mask = np.zeros(picture.shape, np.uint8)
    mask[10:20, 30:40] = 255
    for index in range(count):
        Image.fromarray(picture).save(root / "images" / f"{index}.jpg", quality=95)
        Image.fromarray(mask).save(root / mask_dir / f"{index}.png")


def test_image_folder_reads_pairs_resizes_and_binarises(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set", count=11)
    data = read_image_folder(tmp_path / "set", size=32, orientation="as-is")
    assert data.images.shape == (11, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) == {0, 1}
    assert data.names[:3] == ["set/0", "set/1", "set/2"] and data.names[-1] == "set/10"  # natural order
    assert abs(int(data.images[0, 16, 4]) - 30) < 8  # grey levels pass through
    assert len(read_image_folder(tmp_path / "set", size=32, limit=2)) == 2


def test_image_folder_transposes_slices_stored_with_the_lungs_stacked(tmp_path: Path) -> None:
    _write_folder(tmp_path / "stacked", transposed=True)
    data = read_image_folder(tmp_path / "stacked", size=64)
    assert mediastinum_band(data.images[0]) == "vertical"
    kept = read_image_folder(tmp_path / "stacked", size=64, orientation="as-is")
    assert mediastinum_band(kept.images[0]) == "horizontal"
    np.testing.assert_array_equal(data.masks[0], kept.masks[0].T)  # the mask moved with the image


def test_image_folder_multiclass_keeps_class_indices(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    _write_folder(root, count=1, mask_dir="masks-multiclass")
    mask = np.zeros((60, 80), np.uint8)
    mask[5:25, 5:25], mask[30:50, 40:60] = 1, 2
    Image.fromarray(mask).save(root / "masks-multiclass" / "0.png")
    data = read_image_folder(root, size=40, mask_dir="masks-multiclass", multiclass=True, orientation="as-is")
    assert set(np.unique(data.masks)) == {0, 1, 2}


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    _write_folder(tmp_path / "bad", count=2)
    (tmp_path / "bad" / "masks" / "1.png").unlink()
    with pytest.raises(InputError, match="no mask of the same name.*'1'"):
        read_image_folder(tmp_path / "bad")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(InputError, match="no images"):
        read_image_folder(tmp_path / "empty")


def _write_volume(path: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.0), pixel=sitk.sitkInt16,
                  direction=None) -> None:
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def _nodule_crop(size: int = 44, depth: int = 6) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((depth, size, size), -850, np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[2:4, 12:32, 12:32] = 1  # a 14 mm square nodule at 0.7 mm
    hu[mask > 0] = 20
    return hu, mask


def test_volume_pairs_with_suffixes_in_one_folder_place_lesion_crops_at_lung_scale(tmp_path: Path) -> None:
    hu, mask = _nodule_crop()
    for case in ("A", "B"):
        _write_volume(tmp_path / f"{case}_image.nii.gz", hu)
        _write_volume(tmp_path / f"{case}_label.nii.gz", mask, pixel=sitk.sitkUInt8)
    data = read_volume_pairs(tmp_path, size=128)  # suffixes and context found on their own
    assert len(data) == 4 and data.names[0] == "A:z2"
    side_px = data.masks[0].any(axis=0).sum()
    assert abs(side_px - 14.0 / (300.0 / 128)) <= 1.5  # 14 mm at 2.34 mm/px, not blown up
    assert data.images[0, 0, 0] == window_hu(np.array([-850]))[0]  # canvas: the crop's lung border
    assert data.images[0][data.masks[0] > 0].min() >= window_hu(np.array([20]))[0] - 2
    everything = read_volume_pairs(tmp_path, size=64, image_suffix="_image", mask_suffix="_label",
                                   only_lesion_slices=False, max_slices_per_volume=3)
    assert [name.split(":")[1] for name in everything.names[:3]] == ["z0", "z2", "z5"]
    assert {name.split(":")[0] for name in read_volume_pairs(tmp_path, size=64, pattern="B_*").names} == {"B"}


def test_volume_pairs_in_image_and_mask_folders_and_label_map(tmp_path: Path) -> None:
    hu, mask = _nodule_crop()
    mask[3, 30:40, 30:40] = 2
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    _write_volume(tmp_path / "image" / "n1.nrrd", hu)
    _write_volume(tmp_path / "mask" / "n1.nrrd", mask, pixel=sitk.sitkUInt8)
    data = read_volume_pairs(tmp_path, size=64, label_map={2: 1}, context="lesion")
    assert data.names == ["n1:z3"] and data.masks.max() == 1
    (tmp_path / "image" / "n2.nrrd").write_bytes((tmp_path / "image" / "n1.nrrd").read_bytes())
    with pytest.raises(InputError, match="no mask.*n2"):
        read_volume_pairs(tmp_path / "image", tmp_path / "mask")


def _chest_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 3-slice chest: body, two air-filled lungs, a lesion in the left lung (larger x)."""
    hu = np.full((3, 96, 128), -1000, np.int16)
    hu[:, 10:86, 8:120] = 30
    hu[:, 20:76, 20:58] = -850
    hu[:, 20:76, 70:108] = -850
    mask = np.zeros(hu.shape, np.uint8)
    mask[1, 40:50, 80:90] = 1
    hu[mask > 0] = -200
    return hu, mask


def _box_lungs(hu: np.ndarray, spacing) -> np.ndarray:
    return ((hu > -900) & (hu < -500)).astype(np.uint8)


def test_whole_chest_volumes_are_cropped_to_the_lungs_in_canonical_orientation(tmp_path: Path) -> None:
    hu, mask = _chest_volume()
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # stored with x reversed: read back in LPS
    _write_volume(tmp_path / "c1_ct.nii.gz", hu[:, :, ::-1].copy(), spacing=(2.5, 2.5, 3.0), direction=flipped)
    _write_volume(tmp_path / "c1_effusion.nii.gz", mask[:, :, ::-1].copy(), spacing=(2.5, 2.5, 3.0),
                  pixel=sitk.sitkUInt8, direction=flipped)
    data = read_volume_pairs(tmp_path, size=64, lung_segmenter=_box_lungs)
    assert data.names == ["c1:z1"]
    rows, cols = np.nonzero(data.masks[0])
    assert cols.mean() > 40  # the lesion stays on the patient's left (image right) after reorientation
    assert data.images.min() >= window_hu(np.array([-850]))[0] - 2  # cropped to the lungs: no air outside


def test_8bit_volumes_pass_through_unwindowed(tmp_path: Path) -> None:
    picture = np.full((2, 40, 40), 77, np.uint8)
    mask = np.zeros(picture.shape, np.uint8)
    mask[:, 10:20, 10:20] = 1
    _write_volume(tmp_path / "p_img.mha", picture, pixel=sitk.sitkUInt8)
    _write_volume(tmp_path / "p_seg.mha", mask, pixel=sitk.sitkUInt8)
    data = read_volume_pairs(tmp_path, size=64, context="lesion")
    assert len(data) == 2 and set(np.unique(data.images)) == {77}


def test_decathlon_layout(tmp_path: Path) -> None:
    hu, mask = _nodule_crop()
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    _write_volume(tmp_path / "imagesTr" / "lung_001.nii.gz", hu)
    _write_volume(tmp_path / "labelsTr" / "lung_001.nii.gz", mask, pixel=sitk.sitkUInt8)
    listing = {"name": "Lung", "labels": {"0": "background", "1": "cancer"},
               "training": [{"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(listing))
    data = read_decathlon(tmp_path, size=64)
    assert data.names == ["lung_001:z2", "lung_001:z3"] and data.masks.any()
    assert len(read_dataset_spec(f"decathlon:{tmp_path}", size=64)) == 2
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="training pairs"):
        read_decathlon(tmp_path)


def test_decathlon_volumes_are_rendered_by_the_recipe_asked_for(tmp_path: Path) -> None:
    """A full-slice model's general/pooled data from a Decathlon folder must look like its own input,
    not like lung-window crops (the reader once ignored ``recipe``)."""
    hu, mask = _chest_volume()
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    _write_volume(tmp_path / "imagesTr" / "c1.nii.gz", hu, spacing=(2.5, 2.5, 3.0))
    _write_volume(tmp_path / "labelsTr" / "c1.nii.gz", mask, spacing=(2.5, 2.5, 3.0), pixel=sitk.sitkUInt8)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}]}))
    full = read_dataset_spec(f"decathlon:{tmp_path}", size=64, recipe="full-slice-clahe")
    same = read_volume_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr", size=64, recipe="full-slice-clahe")
    crop = read_dataset_spec(f"decathlon:{tmp_path}", size=64)
    assert np.array_equal(full.images, same.images) and full.masks.any()
    assert not np.array_equal(full.images, crop.images)


def test_patches_npz_scale_float_to_8bit_and_skip_empty_patches(tmp_path: Path) -> None:
    images = np.full((3, 1, 48, 48), 0.5, np.float32)
    labels = np.zeros((3, 1, 48, 48), np.uint8)
    labels[0, 0, 20:30, 20:30] = 1
    labels[2, 0, 0:5, 0:5] = 1
    np.savez(tmp_path / "patches.npz", images=images, labels=labels)
    data = read_patches_npz(tmp_path / "patches.npz", size=128)
    assert data.names == ["patches:0", "patches:2"]
    assert set(np.unique(data.images)) == {128}
    assert abs(data.masks[0].any(axis=0).sum() - 20.0 / (300.0 / 128)) <= 1.5  # 10 px at 2 mm = 20 mm
    np.savez(tmp_path / "hu.npz", images=images * 1000, labels=labels)
    with pytest.raises(InputError, match="windowed to 0..1"):
        read_patches_npz(tmp_path / "hu.npz")


def test_cache_returns_the_same_set_and_notices_changed_files(tmp_path: Path) -> None:
    hu, mask = _nodule_crop()
    (tmp_path / "data").mkdir()
    _write_volume(tmp_path / "data" / "A_image.nii.gz", hu)
    _write_volume(tmp_path / "data" / "A_label.nii.gz", mask, pixel=sitk.sitkUInt8)
    first = read_volume_pairs(tmp_path / "data", size=64, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    start = time.perf_counter()
    again = read_volume_pairs(tmp_path / "data", size=64, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 2.0
    np.testing.assert_array_equal(first.images, again.images)
    assert again.names == first.names and again.source == first.source
    mask[4, 12:32, 12:32] = 1
    _write_volume(tmp_path / "data" / "A_label.nii.gz", mask, pixel=sitk.sitkUInt8)
    os.utime(tmp_path / "data" / "A_label.nii.gz", ns=(1, 10**18))
    assert len(read_volume_pairs(tmp_path / "data", size=64, cache_dir=tmp_path / "cache")) == 3


def test_slice_set_concat_subset_and_checks() -> None:
    one = SliceSet(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8), ["a", "b"], "x")
    two = SliceSet(np.ones((1, 8, 8), np.uint8), np.ones((1, 8, 8), np.uint8), ["c"], "y")
    both = SliceSet.concat([one, two])
    assert len(both) == 3 and both.source == "x+y" and both.names == ["a", "b", "c"]
    assert both.subset([2]).images.max() == 1 and both.subset([2]).names == ["c"]
    with pytest.raises(InputError):
        SliceSet(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 4, 4), np.uint8), ["a", "b"])
    with pytest.raises(InputError, match="different sizes"):
        SliceSet.concat([one, SliceSet(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), np.uint8), ["d"])])


def test_data_spec_parser() -> None:
    assert parse_data_spec("pairs:/data/x") == ("pairs", Path("/data/x"))
    for bad in ("/data/x", "zip:/data/x", "pairs:"):
        with pytest.raises(InputError, match="KIND:PATH"):
            parse_data_spec(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_dataset_spec("folder:/nonexistent/relseg")


# ---------------------------------------------------------------- real data (subsets)


def test_real_covid_semiseg_is_read_in_canonical_orientation(shared_data: Path) -> None:
    data = read_image_folder(shared_data / "covid-semiseg" / "train", limit=6)
    assert data.images.shape == (6, 256, 256) and set(np.unique(data.masks)) <= {0, 1} and data.masks.any()
    assert all(mediastinum_band(image) == "vertical" for image in data.images)
    multi = read_image_folder(shared_data / "covid-semiseg" / "train", mask_dir="masks-multiclass",
                              multiclass=True, limit=6)
    assert set(np.unique(multi.masks)) == {0, 1, 2}
    np.testing.assert_array_equal(multi.masks > 0, data.masks > 0)


def test_real_lesion_sets_through_the_recipe(shared_data: Path) -> None:
    data = read_general_sets(shared_data, names=("lidc", "msd-patches"), limit=3)
    assert set(data.source.split("+")) == {"lidc", "msd-patches"}
    assert data.masks.reshape(len(data), -1).any(axis=1).all()  # lesion slices only
    lesion_fraction = (data.masks > 0).mean(axis=(1, 2))
    assert lesion_fraction.max() < 0.05  # realistic scale: a nodule is a small part of a 300 mm field


def test_real_whole_chest_volume_is_cropped_to_the_lungs(shared_data: Path) -> None:
    data = read_volume_pairs(shared_data / "lung-tumor-volumes", limit=1, context="lungs")
    assert len(data) >= 1 and data.names[0].startswith("lung1:")
    assert data.masks.any(axis=(1, 2)).all()
    assert all(mediastinum_band(image) == "vertical" for image in data.images)


def _normal_ct_folder(tmp_path: Path):
    """Two demo CTs (one stored flipped) in a folder, as a site keeps its non-COVID CT; returns (folder, demo)."""
    from relsegcore.demo import make_demo_ct

    folder = tmp_path / "normal-ct"
    folder.mkdir()
    demo = make_demo_ct(shape=(32, 128, 128), spacing=(2.8, 2.8, 8.0))
    sitk.WriteImage(demo.image, str(folder / "a.nii.gz"))
    sitk.WriteImage(sitk.Flip(demo.image, [True, False, False]), str(folder / "b.nrrd"))  # stored the other way
    return folder, demo


def test_ct_volumes_without_masks_give_evenly_spread_lung_slices_all_background(tmp_path: Path) -> None:
    """``ct:DIR`` negatives: slices with lung only (none above or below the lungs), empty masks, lung crops."""
    folder, demo = _normal_ct_folder(tmp_path)
    data = read_ct_volumes(folder, size=64, slices_per_volume=5)
    assert len(data) == 10 and data.images.shape == (10, 64, 64) and not data.masks.any()
    lung_z = np.flatnonzero(sitk.GetArrayViewFromImage(demo.lungs).any(axis=(1, 2)))
    chosen = [int(name.split(":z")[1]) for name in data.names if name.startswith("a:")]
    assert len(chosen) == 5 and all(lung_z[0] <= z <= lung_z[-1] for z in chosen)
    assert chosen[-1] - chosen[0] >= 0.6 * (lung_z[-1] - lung_z[0])  # spread over the lungs, not bunched
    stored_flipped = [i for i, name in enumerate(data.names) if name.startswith("b:")]
    assert np.array_equal(data.images[stored_flipped], data.images[:5])  # read back in one canonical orientation
    lung_share = (data.images < window_hu(np.array([-700]))[0]).mean(axis=(1, 2))
    assert np.median(lung_share) > 0.3  # cropped to the lungs (the first and last slices hold only their tips)
    assert len(read_dataset_spec(f"ct:{folder}", size=64)) == 2 * min(16, len(lung_z))  # the --negatives path


def test_train_negative_slices_sets_how_many_lung_slices_each_negative_ct_gives(tmp_path: Path) -> None:
    """``relseg train --negatives ct:DIR --negative-slices N``: N slices of each volume (16 without it), spread
    over its lungs; refused below 1 before anything is read."""
    from relsegcore.cli import build_parser
    from relsegcore.cli.train import _read_negatives, run_train

    folder, demo = _normal_ct_folder(tmp_path)
    lung_slices = int(sitk.GetArrayViewFromImage(demo.lungs).any(axis=(1, 2)).sum())
    assert lung_slices > 6

    def train_args(*extra: str):
        return build_parser().parse_args(["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--size", "64",
                                          "--out", str(tmp_path / "run"), "--negatives", f"ct:{folder}", *extra])

    three = _read_negatives(train_args("--negative-slices", "3"))
    assert len(three) == 6 and sorted({name.split(":")[0] for name in three.names}) == ["a", "b"]
    assert len(_read_negatives(train_args())) == 2 * min(16, lung_slices)
    with pytest.raises(RelSegError, match="--negative-slices must be at least 1, not 0"):
        run_train(train_args("--negative-slices", "0"))


def test_negative_noise_adds_each_slice_again_with_white_and_sharp_noise_in_hu(tmp_path: Path) -> None:
    """``--negative-noise 30,60``: the clean slices as before, then each again per level and kind, noise added in HU
    before the rendering (seeded: the same every time); the cache keeps noisy and clean sets apart."""
    from relsegcore.cli import build_parser
    from relsegcore.cli.train import _read_negatives

    folder, _ = _normal_ct_folder(tmp_path)
    cache = tmp_path / "cache"
    clean = read_ct_volumes(folder, size=64, slices_per_volume=3, cache_dir=cache, recipe=FULL_SLICE_CLAHE)
    noisy = read_ct_volumes(folder, size=64, slices_per_volume=3, cache_dir=cache, recipe=FULL_SLICE_CLAHE,
                            noise_hu=(30, 60))
    assert len(clean) == 6 and len(noisy) == 6 * 5
    kinds = sorted({name.split(":")[2] for name in noisy.names if name.count(":") == 2})
    assert kinds == ["sharp30", "sharp60", "white30", "white60"]
    case_a = [i for i, name in enumerate(noisy.names) if name.startswith("a:")]
    np.testing.assert_array_equal(noisy.images[case_a[:3]], clean.images[:3])  # clean slices unchanged
    white30, white60 = (noisy.images[[noisy.names.index(f"{name}:white{level}") for name in clean.names[:3]]]
                        for level in (30, 60))
    change = [np.abs(images.astype(float) - clean.images[:3]).mean() for images in (white30, white60)]
    assert 0 < change[0] < change[1]  # more noise in HU, more change in the rendered slice
    assert not noisy.masks.any()
    again = read_ct_volumes(folder, size=64, slices_per_volume=3, recipe=FULL_SLICE_CLAHE, noise_hu=(30, 60))
    np.testing.assert_array_equal(again.images, noisy.images)  # built again without the cache: the same draws

    def train_args(*extra: str):
        return build_parser().parse_args(["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--size", "64",
                                          "--out", str(tmp_path / "run"), "--negatives", f"ct:{folder}",
                                          "--negative-slices", "2", *extra])

    assert len(_read_negatives(train_args("--negative-noise", "25"))) == 2 * 2 * 3
    with pytest.raises(SystemExit):
        train_args("--negative-noise", "0")


def test_ct_volumes_refuse_a_volume_that_is_not_a_ct(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_volume(folder / "mr.nii.gz", np.full((4, 32, 32), 5000, np.int16), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(InputError, match="mr.nii.gz"):
        read_ct_volumes(folder, size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT volumes"):
        read_ct_volumes(tmp_path / "empty", size=32)


def test_each_real_picture_is_recognised_by_the_recipe_that_prepared_it(shared_data: Path) -> None:
    """Every COVID-SemiSeg screenshot is a lung-window crop and every covid-ct-seg-2d slice a whole slice, one
    picture at a time (a folder goes by the majority), so `relseg evaluate --images` routes each set right."""
    from relsegcore.data.readers import picture_recipe, read_gray_picture

    crops = sorted((shared_data / "covid-semiseg" / "train" / "images").glob("*.jpg"))
    slices = sorted((shared_data / "covid-ct-seg-2d" / "images").glob("*.png"))
    assert len(crops) == 50 and len(slices) == 1163
    assert [picture_recipe([read_gray_picture(p)]) for p in crops] == ["lung-crop"] * len(crops)
    assert [picture_recipe([read_gray_picture(p)]) for p in slices] == ["full-slice-clahe"] * len(slices)


def test_whole_ct_slices_are_not_transposed_by_the_mediastinum_test(tmp_path: Path) -> None:
    """A dark frame (air and table around the body) marks a whole CT slice: kept as stored even where the
    mediastinum test votes "transposed"; forcing it still turns it."""
    root = tmp_path / "whole"
    _write_folder(root, count=1, transposed=True, frame=12)  # lungs one above the other, framed by black
    assert mediastinum_band(_chest_picture(transposed=True, frame=12)) == "horizontal"
    assert mediastinum_band(read_image_folder(root, size=64).images[0]) == "horizontal"
    assert mediastinum_band(read_image_folder(root, size=64, orientation="transposed").images[0]) == "vertical"
