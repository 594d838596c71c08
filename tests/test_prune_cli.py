"""``npas-tvm plan`` / ``prune`` / ``inspect`` on the zoo: prune -> inspect round trips,
pruned models run in onnxruntime, and bad plans give one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npas_tvm.cli import main
from npas_tvm.layers import load_model_layers
from npas_tvm.plan import load_plan
from npas_tvm.pruning import inspect_proto
from npas_tvm.zoo import ZOO_NAMES


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_onnx(path: str) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    shape = [d if isinstance(d, int) else 1 for d in first.shape]
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return session.run(None, {first.name: data})[0]


def assert_round_trip(pruned: str, plan_path: str) -> None:
    """``inspect`` finds, in every layer, the scheme the plan applied, at its rate."""
    plan = load_plan(plan_path)
    model, layers = load_model_layers(pruned)
    for row in inspect_proto(model.proto, layers):
        planned = plan.spec_for(row.name)
        assert row.spec.scheme == planned.scheme, (row.name, row.spec, planned)
        achieved = row.total / max(row.total - row.zeros, 1)
        assert row.spec.rate == pytest.approx(achieved, rel=0.03), row.name


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_rule_plan_prune_inspect_round_trip(name, zoo_onnx, tmp_path, capsys):
    model = zoo_onnx(name)
    plan_path, pruned = str(tmp_path / "rule.json"), str(tmp_path / "pruned.onnx")
    code, out, _ = run_cli(["plan", model, "--rule", "-o", plan_path], capsys)
    assert code == 0 and f"wrote {plan_path}" in out
    code, out, _ = run_cli(["prune", model, "--plan", plan_path, "-o", pruned], capsys)
    assert code == 0
    assert "asked" in out and "achieved" in out and "total" in out and "MACs" in out
    assert "nearest rate the structure attains" not in out  # the rule's rates are attained
    code, out, _ = run_cli(["inspect", pruned], capsys)
    assert code == 0 and "strongest scheme" in out
    assert_round_trip(pruned, plan_path)
    original, result = run_onnx(model), run_onnx(pruned)
    assert result.shape == original.shape and np.isfinite(result).all()


MIXED_PLAN = {
    "conv1.weight": {"scheme": "block_punched", "rate": 2.0, "block": [8, 1]},
    "layer1.0.conv1.weight": {"scheme": "filter", "rate": 2.0},
    "layer1.0.conv2.weight": {"scheme": "pattern", "rate": 3.0, "patterns": 8},
    "layer2.0.conv1.weight": {"scheme": "unstructured", "rate": 5.0},
    "layer2.0.conv2.weight": {"scheme": "block_punched", "rate": 5.0, "block": [8, 4]},
    "layer2.0.downsample.0.weight": {"scheme": "unaligned_block", "rate": 3.0, "block": [4, 1]},
    "layer3.0.downsample.0.weight": {"scheme": "block_based", "rate": 4.0, "block": [8, 4],
                                     "rows": True},
    "fc.weight": {"scheme": "block_based", "rate": 5.0, "block": [8, 4]},
}


def test_every_scheme_on_resnet18(zoo_onnx, tmp_path, capsys):
    model = zoo_onnx("resnet18")
    plan_path, pruned = str(tmp_path / "mixed.json"), str(tmp_path / "pruned.onnx")
    with open(plan_path, "w") as handle:
        json.dump({"format": "npas-plan", "version": 1, "layers": MIXED_PLAN,
                   "default": {"scheme": "dense"}}, handle)
    code, out, _ = run_cli(["prune", model, "--plan", plan_path, "-o", pruned], capsys)
    assert code == 0
    shrunk = next(line for line in out.splitlines() if line.startswith("layer1.0.conv2."))
    assert "+" in shrunk
    assert "layer1.0.conv2.weight: in-channels 64->32 (filters of layer1.0.conv1.weight)" in out
    assert_round_trip(pruned, plan_path)
    assert np.isfinite(run_onnx(pruned)).all()


def test_filter_pruned_channels_output_zero(zoo_onnx, tmp_path, capsys):
    """A removed filter's weights and bias are zero, so removing it later is exact."""
    import onnx
    from onnx import numpy_helper

    model = zoo_onnx("vgg_cifar")
    plan_path, pruned = str(tmp_path / "filter.json"), str(tmp_path / "pruned.onnx")
    with open(plan_path, "w") as handle:
        json.dump({"format": "npas-plan", "version": 1,
                   "layers": {"features.3.weight": {"scheme": "filter", "rate": 4.0}}}, handle)
    assert run_cli(["prune", model, "--plan", plan_path, "-o", pruned], capsys)[0] == 0
    arrays = {i.name: numpy_helper.to_array(i) for i in onnx.load(pruned).graph.initializer}
    removed = ~arrays["features.3.weight"].reshape(64, -1).any(axis=1)
    assert removed.sum() == 48 and (arrays["features.3.bias"][removed] == 0).all()


def test_dense_plan_leaves_the_model_unchanged(zoo_onnx, tmp_path, capsys):
    model = zoo_onnx("vgg_cifar")
    pruned = str(tmp_path / "same.onnx")
    code, out, _ = run_cli(["prune", model, "--plan", "rule", "--rate", "1",
                            "-o", pruned], capsys)
    assert code == 0 and "1.00x fewer" in out
    assert np.array_equal(run_onnx(model), run_onnx(pruned))


def bad_plan(tmp_path, layers) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "npas-plan", "version": 1, "layers": layers}))
    return str(path)


@pytest.mark.parametrize("args, fragments", [
    (lambda m, t: ["prune", m, "--plan", bad_plan(t, {"conv9.weight": {"scheme": "dense"}}),
                   "-o", str(t / "x.onnx")], ["layer 'conv9.weight'", "not a prunable layer"]),
    (lambda m, t: ["prune", m, "--plan", bad_plan(t, {"features.0.weight": {
        "scheme": "pattern", "rate": 0.5}}), "-o", str(t / "x.onnx")],
     ["layer 'features.0.weight'", "field 'rate'"]),
    (lambda m, t: ["prune", m, "--plan", bad_plan(t, {"classifier.weight": {
        "scheme": "block_based", "rate": 3, "block": [16, 4]}}), "-o", str(t / "x.onnx")],
     ["layer 'classifier.weight'", "field 'block'", "16 > 10"]),
    (lambda m, t: ["prune", m, "--plan", bad_plan(t, {}), "--rate", "3", "-o",
                   str(t / "x.onnx")], ["--rate applies to --plan rule"]),
    (lambda m, t: ["prune", m, "--plan", str(t / "none.json"), "-o", str(t / "x.onnx")],
     ["no such plan file"]),
    (lambda m, t: ["prune", m, "--plan", "rule", "--rate", "0.5", "-o", str(t / "x.onnx")],
     ["--rate 0.5"]),
    (lambda m, t: ["plan", m, "-o", str(t / "p.json")], ["--rule"]),
    (lambda m, t: ["inspect", str(t / "missing.onnx")], ["missing.onnx", "no such file"]),
])
def test_bad_input_exits_2_with_one_line(args, fragments, zoo_onnx, tmp_path, capsys):
    code, out, err = run_cli(args(zoo_onnx("vgg_cifar"), tmp_path), capsys)
    assert code == 2, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
