"""The plan format: round trips, and one clear line naming layer and field per mistake."""

from __future__ import annotations

import json

import pytest

from npas_tvm.errors import PlanError
from npas_tvm.layers import Layer
from npas_tvm.plan import Plan, load_plan, save_plan, validate_plan
from npas_tvm.schemes import (
    CONV, CONV1X1, DEPTHWISE, FC, BlockBasedSpec, BlockPunchedSpec, DenseSpec, FilterSpec,
    PatternSpec, UnalignedBlockSpec, UnstructuredSpec)
from search.rule_mapper import lighter_rate, rule_plan

LAYERS = [
    Layer("stem.weight", "stem", "Conv", CONV, (16, 3, 3, 3), output_spatial=(16, 16),
          first=True),
    Layer("conv3.weight", "conv3", "Conv", CONV, (64, 32, 3, 3), output_spatial=(8, 8)),
    Layer("dw.weight", "dw", "Conv", DEPTHWISE, (64, 1, 3, 3), groups=64),
    Layer("pw.weight", "pw", "Conv", CONV1X1, (128, 64, 1, 1), output_spatial=(8, 8)),
    Layer("fc.weight", "fc", "Gemm", FC, (10, 128), last=True),
]


def write(tmp_path, data) -> str:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def plan_with(layers=None, **top) -> dict:
    return {"format": "npas-plan", "version": 1,
            "layers": {} if layers is None else layers, **top}


def test_round_trip_of_every_scheme(tmp_path):
    plan = Plan(layers={
        "stem.weight": UnstructuredSpec(rate=2.0),
        "conv3.weight": PatternSpec(rate=3.0, patterns=6),
        "dw.weight": FilterSpec(rate=2.0),
        "pw.weight": UnalignedBlockSpec(rate=5.0, block=(4, 1)),
        "fc.weight": BlockBasedSpec(rate=2.5, block=(8, 4), rows=True)},
        default=BlockPunchedSpec(rate=2.0, block=(4, 4)), meta={"source": "test"})
    loaded = load_plan(save_plan(plan, str(tmp_path / "p.json")))
    assert loaded == plan
    assert json.loads((tmp_path / "p.json").read_text())["layers"]["fc.weight"] == {
        "scheme": "block_based", "rate": 2.5, "block": [8, 4], "rows": True}


def test_the_issue_example_parses(tmp_path):
    plan = load_plan(write(tmp_path, plan_with({
        "conv3.weight": {"scheme": "pattern", "rate": 3.0, "patterns": 8},
        "fc.weight": {"scheme": "block_based", "rate": 5.0, "block": [16, 4]}},
        default={"scheme": "dense"})))
    assert plan.spec_for("conv3.weight") == PatternSpec(rate=3.0, patterns=8)
    assert plan.spec_for("other") == DenseSpec()


def assert_one_line(err: PlanError, *fragments: str) -> None:
    message = str(err)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("content, fragments", [
    ("{not json", ["not valid JSON", "line 1"]),
    ("[]", ["expected a JSON object"]),
    (plan_with(format="other"), ["'format'"]),
    (plan_with(version=2), ["'version'", "version 1"]),
    (plan_with(extra=1), ["unknown top-level key 'extra'"]),
    (plan_with(layers=[]), ["'layers'"]),
    (plan_with({"conv3.weight": {"scheme": "pattern", "rate": 0.5}}),
     ["layer 'conv3.weight'", "field 'rate'", "below 1"]),
    (plan_with({"conv3.weight": {"scheme": "pattern", "rate": "3"}}),
     ["layer 'conv3.weight'", "field 'rate'"]),
    (plan_with({"conv3.weight": {"scheme": "pattern"}}),
     ["layer 'conv3.weight'", "field 'rate'", "missing"]),
    (plan_with({"conv3.weight": {"scheme": "pattern", "rate": 3, "block": [8, 4]}}),
     ["layer 'conv3.weight'", "field 'block'", "unknown"]),
    (plan_with({"conv3.weight": {"scheme": "blocky", "rate": 3}}),
     ["layer 'conv3.weight'", "field 'scheme'", "'blocky' is unknown"]),
    (plan_with({"conv3.weight": {"rate": 3}}), ["layer 'conv3.weight'", "field 'scheme'"]),
    (plan_with({"conv3.weight": {"scheme": "block_punched", "rate": 3, "block": [8, -4]}}),
     ["layer 'conv3.weight'", "field 'block'"]),
    (plan_with({"conv3.weight": {"scheme": "pattern", "rate": 3, "patterns": 0}}),
     ["layer 'conv3.weight'", "field 'patterns'"]),
    (plan_with(default={"scheme": "dense", "rate": 3}), ["default", "field 'rate'"]),
])
def test_load_errors_are_one_clear_line(tmp_path, content, fragments):
    path = write(tmp_path, content)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert_one_line(info.value, path, *fragments)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError) as info:
        load_plan(str(tmp_path / "nope.json"))
    assert_one_line(info.value, "nope.json", "no such plan file")


@pytest.mark.parametrize("layers, default, fragments", [
    ({"conv9.weight": DenseSpec()}, None,
     ["layer 'conv9.weight'", "not a prunable layer", "did you mean 'conv3.weight'"]),
    ({"pw.weight": PatternSpec(rate=3.0)}, None,
     ["layer 'pw.weight'", "field 'scheme'", "does not fit a 1x1 conv"]),
    ({"conv3.weight": BlockBasedSpec(rate=3.0)}, None,
     ["layer 'conv3.weight'", "field 'scheme'", "KxK conv"]),
    ({"fc.weight": BlockBasedSpec(rate=3.0, block=(16, 4))}, None,
     ["layer 'fc.weight'", "field 'block'", "larger than the weight", "16 > 10"]),
    ({"dw.weight": BlockPunchedSpec(rate=3.0, block=(8, 4))}, None,
     ["layer 'dw.weight'", "field 'block'", "4 > 1 input channels"]),
    ({}, PatternSpec(rate=3.0), ["default", "'pw.weight'", "field 'scheme'"]),
])
def test_validation_errors_name_layer_and_field(layers, default, fragments):
    plan = Plan(layers=layers, default=default or DenseSpec())
    with pytest.raises(PlanError) as info:
        validate_plan(plan, LAYERS, "p.json")
    assert_one_line(info.value, "p.json", *fragments)


def test_rule_plan_follows_the_rules_and_validates():
    plan = rule_plan(LAYERS, rate=3.0)
    validate_plan(plan, LAYERS)
    assert plan.spec_for("conv3.weight") == PatternSpec(rate=3.0)
    assert plan.spec_for("dw.weight") == DenseSpec()
    assert plan.spec_for("pw.weight") == BlockBasedSpec(rate=3.0, block=(8, 4))
    assert plan.spec_for("fc.weight").rate == lighter_rate(3.0) == 2.0
    assert plan.spec_for("stem.weight") == DenseSpec()  # 432 weights: tiny
    high = rule_plan(LAYERS, rate=10.0)
    assert high.spec_for("conv3.weight").scheme == "block_punched"
    assert all(spec == DenseSpec() for spec in rule_plan(LAYERS, rate=1.0).layers.values())
    with pytest.raises(PlanError):
        rule_plan(LAYERS, rate=0.5)


def test_rules_for_a_target_follow_its_kernels(zoo_onnx):
    from npas_tvm.layers import load_model_layers
    from search.rule_mapper import RuleTarget, rule_choices

    _, layers = load_model_layers(zoo_onnx("resnet18"))
    conv = next(layer for layer in layers if layer.name == "layer1.0.conv1.weight")

    def choice(target):
        return rule_choices([conv], 3.0, target)[0]

    fast = RuleTarget(lanes=16, speed=lambda scheme: 1.0)
    slow = RuleTarget(lanes=16, speed=lambda scheme: 0.3 if scheme == "pattern" else 0.75)
    absent = RuleTarget(lanes=8, has_kernel=lambda scheme: scheme != "pattern")
    assert choice(None).spec.scheme == "pattern" == choice(fast).spec.scheme
    assert choice(slow).spec.scheme == "block_punched" and "slower" in choice(slow).reason
    assert choice(slow).spec.block == (16, 4)                    # rows = the SIMD width
    assert choice(absent).spec.block == (8, 4) and "no pattern kernel" in choice(absent).reason
