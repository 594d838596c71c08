"""`npas-tvm search` end to end on the small VGG with digits, at a tiny budget: every output,
resuming, and compiling the result (numerics checked against onnxruntime)."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from npas_tvm.cli import main
from npas_tvm.layers import extract_layers
from npas_tvm.plan import load_plan, validate_plan
from npas_tvm.schemes import satisfies

FAST = ["--epochs", "1", "--dense-epochs", "1", "--final-epochs", "1", "--latency-samples", "12", "--no-progress",
        "--threads", "2"]


def _evaluations(out) -> list[dict]:
    with open(os.path.join(out, "search_log.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r.get("kind") == "eval"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("search") / "vgg")
    code = main(["search", "vgg_cifar", "--budget", "2", "--baselines", "rule,random",
                 "--out", out, *FAST])
    assert code == 0
    return out


def test_search_writes_every_output(searched):
    for name in ("plan.json", "model.pruned.onnx", "weights.pt", "search_log.jsonl",
                 "pareto.png", "summary.md", "dense.pt"):
        assert os.path.getsize(os.path.join(searched, name)) > 0, name
    sources = [r["source"] for r in _evaluations(searched)]
    assert sources.count("npas") == 2 and sources.count("random") == 2
    assert 1 <= sources.count("rule") <= 2
    summary = open(os.path.join(searched, "summary.md")).read()
    for row in ("| dense |", "| search (npas) |", "| rule baseline |", "| random baseline |",
                "| chosen plan, delivered weights |"):
        assert row in summary


def test_the_pruned_onnx_follows_the_plan(searched):
    proto = onnx.load(os.path.join(searched, "model.pruned.onnx"))
    layers = extract_layers(proto)
    plan = load_plan(os.path.join(searched, "plan.json"))
    validate_plan(plan, layers)
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    pruned = 0
    for layer in layers:
        spec = plan.spec_for(layer.name)
        weight = layer.to_scheme_layout(weights[layer.name])
        assert satisfies(weight, spec), layer.name
        pruned += spec.scheme != "dense"
    assert pruned >= 1
    assert plan.meta["source"] == "search" and plan.meta["predicted_ms"] > 0


def test_rerun_continues_the_log(searched, capsys):
    before = _evaluations(searched)
    assert main(["search", "vgg_cifar", "--budget", "3", "--baselines", "rule,random",
                 "--out", searched, "--no-measure", *FAST]) == 0
    after = _evaluations(searched)
    assert after[:len(before)] == before
    assert [r["source"] for r in after[len(before):]].count("npas") == 1
    assert "continuing" in capsys.readouterr().out


def test_the_chosen_plan_compiles_and_matches_onnxruntime(searched, tmp_path):
    assert main(["compile", os.path.join(searched, "model.pruned.onnx"), "--target", "host",
                 "--npas", os.path.join(searched, "plan.json"), "--check",
                 "-o", str(tmp_path / "chosen.so")]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--data", "/nonexistent/data.npz"], "/nonexistent/data.npz"),
    (["--baselines", "greedy"], "--baselines: unknown baseline 'greedy'"),
    (["--latency-ms", "-1"], "--latency-ms -1.0: must be positive"),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, message):
    code = main(["search", "vgg_cifar", "--out", str(tmp_path / "o"), "--budget", "1",
                 *FAST, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
