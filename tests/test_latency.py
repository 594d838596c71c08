"""The search's latency model (search/latency.py) and ``npas-tvm latency``: records that
resume, sane predictions, a save/load round trip, the command's output and errors.
No timing of this machine is asserted."""

from __future__ import annotations

import os

import pytest

from npas_tvm.plan import Plan, save_plan
from npas_tvm.schemes import BlockPunchedSpec, DenseSpec

SAMPLES = 20


@pytest.fixture(scope="module")
def built(zoo_onnx, tmp_path_factory):
    from search.latency import build_latency_model

    path = zoo_onnx("vgg_cifar")
    work = str(tmp_path_factory.mktemp("latency"))
    model = build_latency_model(path, "host", work, samples=SAMPLES, progress=False)
    return path, work, model


def _lines(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def test_records_resume(built):
    from search.latency import RECORDS_FILE, build_latency_model, read_records

    path, work, _ = built
    records_path = os.path.join(work, RECORDS_FILE)
    first = _lines(records_path)
    layer_records = [r for r in read_records(records_path).values() if "features" in r]
    assert 8 <= len(layer_records) <= SAMPLES  # vgg_cifar: 8 layers' dense records first
    assert first == len(layer_records) + 1  # + the dense model's measurement
    build_latency_model(path, "host", work, samples=SAMPLES, progress=False)
    assert _lines(records_path) == first  # nothing measured again
    build_latency_model(path, "host", work, samples=SAMPLES + 2, progress=False)
    assert _lines(records_path) == first + 2  # only the two new ones


def test_predictions_positive_and_pruning_pays(built):
    from npas_tvm.layers import load_model_layers
    from search.space import search_space

    path, _, model = built
    _, layers = load_model_layers(path)
    big = max(layers, key=lambda layer: layer.macs)
    for layer, actions in search_space(layers).items():
        for spec in actions:
            assert model.predict_layer(next(l for l in layers if l.name == layer), spec) > 0
    dense = model.predict_layer(big, DenseSpec())
    assert model.predict_layer(big, BlockPunchedSpec(rate=10.0, block=(16, 4))) < dense
    plan = Plan(layers={big.name: BlockPunchedSpec(rate=10.0, block=(16, 4))})
    assert model.predict_plan(layers, plan) < model.predict_plan(layers, Plan())
    # the dense plan is calibrated to the dense model's measured time
    assert model.predict_plan(layers, Plan()) == pytest.approx(model.meta["dense_ms"], rel=1e-6)


def test_save_load_round_trip(built, tmp_path):
    from npas_tvm.layers import load_model_layers
    from search.latency import LatencyModel
    from search.space import search_space

    path, _, model = built
    _, layers = load_model_layers(path)
    saved = model.save(str(tmp_path / "model.json"))
    loaded = LatencyModel.load(saved)
    assert loaded.base_ms == model.base_ms and loaded.target == model.target
    for layer_name, actions in search_space(layers).items():
        layer = next(l for l in layers if l.name == layer_name)
        for spec in actions[:3]:
            assert loaded.predict_layer(layer, spec) == model.predict_layer(layer, spec)


def test_cli_predicted_and_measured(built, capsys, tmp_path):
    from npas_tvm.cli import main

    path, work, _ = built
    assert main(["latency", path, "--plan", "rule", "--work-dir", work]) == 0
    out = capsys.readouterr().out
    assert "features.3.weight" in out and "predicted:" in out and "measured:" in out
    assert "predicted / measured" in out


def test_cli_bad_plan_one_line(built, capsys, tmp_path):
    from npas_tvm.cli import main

    path, work, _ = built
    missing = str(tmp_path / "missing.json")
    assert main(["latency", path, "--plan", missing, "--work-dir", work]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0]
    bad = save_plan(Plan(layers={"no.such.layer": DenseSpec()}), str(tmp_path / "bad.json"))
    assert main(["latency", path, "--plan", bad, "--work-dir", work]) == 2
    assert "no.such.layer" in capsys.readouterr().err


def test_non_host_target_needs_a_device(built, capsys, tmp_path):
    from npas_tvm.cli import main

    path, _, _ = built
    assert main(["latency", path, "--plan", "dense", "--target", "arm-cpu",
                 "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rpc-tracker" in err[0]


@pytest.mark.device
def test_records_measured_on_the_emulated_device(arm_device, tmp_path):
    """arm-cpu layer records come over RPC from the (emulated) phone, and the model built
    from them predicts the device's plans."""
    from npas_tvm.layers import load_model_layers
    from search.latency import RECORDS_FILE, build_latency_model, read_records
    from onnx_graphs import small_cnn

    tracker, key = arm_device
    path = small_cnn(tmp_path / "m.onnx")
    model = build_latency_model(str(path), "arm-cpu", str(tmp_path / "lat"), samples=6,
                                rpc_tracker=tracker, rpc_key=key, progress=False)
    records = [r for r in read_records(str(tmp_path / "lat" / RECORDS_FILE)).values()
               if "features" in r]
    assert 1 <= len(records) <= 6 and all(r["target"] == "arm-cpu" for r in records)
    assert all(r["ms"] > 0 for r in records)
    _, layers = load_model_layers(str(path))
    assert model.predict_plan(layers, Plan()) > 0
