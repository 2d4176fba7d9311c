"""The engines that run the network on the CPU: OpenVINO (fast path) must give PyTorch's labels (the reference)."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from relsegcore import engines, imageio, pipeline, zoo
from relsegcore.errors import RelSegError
from relsegcore.inference import CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE, batch_size_for, predict_slices
from relsegcore.metrics import dice

CPU = torch.device("cpu")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO is not installed (relsegcore[fast])")
EVERY_NTH_SLICE = 8  # of each real CT: the 12 non-COVID CTs, about 90 slices, in half a minute a model


def test_auto_is_torch_on_a_gpu_for_3d_models_and_without_openvino(monkeypatch):
    assert engines.resolve_engine("auto", torch.device("cuda"), 2) == "torch"
    assert engines.resolve_engine("auto", CPU, 3) == "torch"
    assert engines.resolve_engine("torch", CPU, 2) == "torch"
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert engines.resolve_engine("auto", CPU, 2) == "torch"


def test_asking_for_a_missing_or_unknown_engine_says_what_to_do(monkeypatch):
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    with pytest.raises(RelSegError, match=r"relsegcore\[fast\]"):
        engines.resolve_engine("openvino", CPU, 2)
    with pytest.raises(RelSegError, match="Unknown engine 'onnx'"):
        engines.resolve_engine("onnx", CPU, 2)


def test_one_slice_at_a_time_on_the_cpu_batches_on_the_gpu():
    assert batch_size_for(CPU) == CPU_BATCH_SIZE == 1
    assert batch_size_for(torch.device("cuda")) == DEFAULT_BATCH_SIZE > 1


@needs_openvino
def test_a_failed_conversion_falls_back_to_pytorch_with_a_warning(monkeypatch, caplog, tmp_path):
    import openvino

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))  # no cached conversion
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    loaded = zoo.load_model("covid-infection-2d", CPU, "openvino")
    assert loaded.engine == "openvino"
    with caplog.at_level(logging.WARNING):
        probabilities = predict_slices(loaded, np.zeros((1, 256, 256), np.uint8))
    assert loaded.engine == "torch" and loaded.compiled is loaded.network
    assert "unsupported operation" in caplog.text
    assert probabilities.shape == (1, 2, 256, 256)


@needs_openvino
def test_the_conversion_is_cached_and_a_tampered_cache_is_converted_again(monkeypatch, caplog, tmp_path):
    import openvino

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    conversions = []
    real_convert = openvino.convert_model
    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: conversions.append(1) or real_convert(*a, **k))
    images = np.random.default_rng(1).integers(0, 256, (2, 256, 256), dtype=np.uint8)
    first = predict_slices(zoo.load_model("covid-infection-2d", CPU, "openvino"), images)
    assert len(conversions) == 1 and len(list(engines.cache_dir().glob("*.xml"))) == 1
    again = predict_slices(zoo.load_model("covid-infection-2d", CPU, "openvino"), images)
    assert len(conversions) == 1 and np.allclose(first, again, atol=1e-5)  # read from the cache

    weights = next(engines.cache_dir().glob("*.bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)  # other weights under the same name
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        tampered = predict_slices(zoo.load_model("covid-infection-2d", CPU, "openvino"), images)
    assert "disagrees with the weights" in caplog.text and len(conversions) == 2
    assert np.allclose(first, tampered, atol=1e-5)


def test_the_loaded_model_is_kept_for_the_next_call_until_its_weights_change(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_LOADED", {})
    first = pipeline.load_model_cached("covid-infection-2d", CPU, "torch")
    assert pipeline.load_model_cached("covid-infection-2d", CPU, "torch") is first
    card = zoo.find_model("covid-infection-2d")
    copy = tmp_path / "copy.pt"
    network = zoo.build_network(card)
    network.load_state_dict(zoo.load_state_dict_verified(card.path, card.sha256))
    with torch.no_grad():
        next(network.parameters()).add_(1.0)  # other weights, so another sha256
    changed = zoo.ModelCard.from_dict({**card.to_dict(), "name": "copy", "file": "copy.pt", "sha256": ""})
    zoo.save_model(network, changed, tmp_path)
    other = pipeline.load_model_cached(copy, CPU, "torch")
    assert other is not first and other.card.sha256 != first.card.sha256
    assert len(pipeline._LOADED) <= pipeline.KEPT_MODELS


@pytest.fixture(scope="module")
def real_cts(shared_data) -> dict[str, np.ndarray]:
    """Every EVERY_NTH_SLICE-th slice (canonical HU) of the real CTs in ../shared/data, and the COVID-19 slices."""
    paths = sorted((shared_data / "pleural-effusion").glob("*_ct.nii.gz"))
    paths += sorted((shared_data / "lung-tumor-volumes").glob("*_image.nrrd"))
    volumes = {}
    for path in paths:
        canonical = imageio.to_canonical(sitk.ReadImage(str(path)))
        volumes[path.name.split("_")[0] if "LUNG1" in path.name else path.stem] = (
            sitk.GetArrayFromImage(canonical)[::EVERY_NTH_SLICE])
    covid = [np.load(p)["image"] for p in sorted((shared_data / "covid-hu-slices").glob("*.npz"))]
    volumes["covid-hu-slices"] = np.stack(covid).astype(np.int16)
    return volumes


@needs_openvino
@pytest.mark.parametrize(("model", "every"), [("covid-infection-2d", 1), ("covid-lungs-2d", 2)])
def test_openvino_labels_match_pytorch_on_real_ct(real_cts, model, every):
    """The lung model runs four views a slice (mirrored, upside down): half the slices keep its run near the
    infection model's, and its masks stay far above the 1,000 pixels a CT needs to be scored."""
    reference = zoo.load_model(model, CPU, "torch")
    fast = zoo.load_model(model, CPU, "openvino")
    pooled_reference, pooled_fast, scores = [], [], {}
    for name, volume in real_cts.items():
        hu = volume[::every]
        z = np.arange(len(hu))
        expected, _ = pipeline.slice_labels_2d(reference, hu, z, None)
        found, _ = pipeline.slice_labels_2d(fast, hu, z, None)
        assert fast.engine == "openvino"
        pooled_reference.append(expected.ravel() > 0)
        pooled_fast.append(found.ravel() > 0)
        if np.count_nonzero(expected) >= 1000:  # a few pixels' difference is no measure of a tiny mask
            scores[name] = dice(found > 0, expected > 0)
    overall = dice(np.concatenate(pooled_fast)[None], np.concatenate(pooled_reference)[None])
    print(model, round(overall, 4), {k: round(v, 4) for k, v in scores.items()})
    assert overall >= 0.99, overall
    assert scores and min(scores.values()) >= 0.99, scores
