"""The pruning passes on Relax: annotate, detect, apply, lower to sparse kernels.

Small ONNX graphs built here cover every kernel option the lowering meets (stride,
padding, dilation, groups, 1x1 / 3x3 / 5x5, bias or none, fused ReLU / clip / residual
add, NCHW neighbours, FC and MatMul weights); every compiled model is checked against
onnxruntime on the pruned ONNX the compile writes.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tvm
from onnx_graphs import make_graph, small_cnn

from npas_tvm.compiler import build, import_onnx
from npas_tvm.model_io import load_onnx
from npas_tvm.runtime import TVMRunner, compare, run_onnxruntime
from npas_tvm.schemes import (BlockBasedSpec, BlockPunchedSpec, PatternSpec, make_mask,
                              satisfies)
from npas_tvm.sparse_compile import write_pruned_onnx
from npas_tvm.targets import resolve_target
from relay_passes import (AnnotatePruning, ApplyPruning, DetectSparsity,
                          LowerToSparseKernels, RemoveFilters)
from relay_passes.weights import attached_params, pruning_annotations, weight_uses


PLAN = {"conv1.weight": BlockPunchedSpec(rate=3, block=(16, 4)),
        "conv2.weight": BlockBasedSpec(rate=4, block=(16, 4)),
        "conv3.weight": BlockPunchedSpec(rate=3, block=(8, 1)),   # depthwise: stays dense
        "conv4.weight": BlockPunchedSpec(rate=5, block=(16, 8)),
        "fc5.weight": BlockBasedSpec(rate=2, block=(8, 4))}


def _pruned(path):
    model = load_onnx(path)
    mod = tvm.transform.Sequential([AnnotatePruning(PLAN), ApplyPruning()])(
        import_onnx(model).mod)
    return model, mod


def test_weight_uses_name_every_prunable_layer(tmp_path):
    model = load_onnx(small_cnn(tmp_path / "m.onnx"))
    uses = {use.name: use for use in weight_uses(import_onnx(model).mod["main"])}
    assert set(uses) == {"conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight",
                         "fc5.weight"}
    assert uses["conv3.weight"].kind == "depthwise"
    assert uses["conv2.weight"].kind == "conv1x1"
    assert uses["fc5.weight"].kind == "fc" and uses["fc5.weight"].weight_shape == (24, 64)


def test_annotate_records_the_plan_and_skips_misfits(tmp_path, caplog):
    model = load_onnx(small_cnn(tmp_path / "m.onnx"))
    plan = {**PLAN, "conv2.weight": PatternSpec(rate=3)}   # patterns are 3x3 only
    with caplog.at_level(logging.WARNING, logger="npas_tvm"):
        mod = AnnotatePruning(plan)(import_onnx(model).mod)
    specs = pruning_annotations(mod["main"])
    assert "conv2.weight" not in specs and specs["conv1.weight"] == PLAN["conv1.weight"]
    assert "conv2.weight" in caplog.text and "stays dense" in caplog.text


def test_apply_pruning_uses_the_shared_masks_and_leaves_its_input(tmp_path):
    model = load_onnx(small_cnn(tmp_path / "m.onnx"))
    original = import_onnx(model).mod
    before = attached_params(original["main"])
    pruned = tvm.transform.Sequential([AnnotatePruning(PLAN), ApplyPruning()])(original)
    after = attached_params(pruned["main"])
    for name, spec in PLAN.items():
        weight = before[name]
        expected = np.where(make_mask(weight, spec), weight, 0)
        np.testing.assert_array_equal(after[name], expected)
        assert satisfies(after[name], spec)
    np.testing.assert_array_equal(attached_params(original["main"])["conv1.weight"],
                                  before["conv1.weight"])
    assert not pruning_annotations(original["main"])


def test_detect_sparsity_finds_what_was_applied(tmp_path):
    model, mod = _pruned(small_cnn(tmp_path / "m.onnx"))
    values = attached_params(mod["main"])
    pruned_path = str(tmp_path / "pruned.onnx")
    write_pruned_onnx(model, values, pruned_path)
    detected = pruning_annotations(DetectSparsity()(import_onnx(load_onnx(pruned_path)).mod)
                                   ["main"])
    for name, spec in PLAN.items():
        assert detected[name].scheme == spec.scheme, name
        assert detected[name].block[0] >= spec.block[0], name   # rows at least as coarse
        assert satisfies(values[name], detected[name])


def _lower_and_check(model, mod, tmp_path, target="host"):
    rows = []
    spec = resolve_target(target)
    executable = build(mod, spec, on_layer=rows.append)
    if target != "host":
        return rows, executable
    library = str(tmp_path / f"lib{len(list(tmp_path.iterdir()))}.so")
    executable.export_library(library)
    pruned = write_pruned_onnx(model, attached_params(mod["main"]), str(tmp_path / "p.onnx"))
    inputs = pruned.random_inputs()
    result = compare(TVMRunner(library, list(pruned.input_shapes)).run(inputs),
                     run_onnxruntime(pruned.proto, inputs))
    assert result.ok, result.report()
    return rows, executable


def test_lowering_matches_onnxruntime_and_reports_each_layer(tmp_path, caplog):
    model, mod = _pruned(small_cnn(tmp_path / "m.onnx"))
    with caplog.at_level(logging.WARNING, logger="npas_tvm"):
        rows, _ = _lower_and_check(model, mod, tmp_path)
    by_name = {row.name: row for row in rows}
    assert set(by_name) == set(PLAN)
    assert by_name["conv3.weight"].kernel is None and "depthwise" in by_name["conv3.weight"].reason
    assert "conv3.weight" in caplog.text
    for name in ("conv1.weight", "conv2.weight", "conv4.weight", "fc5.weight"):
        row = by_name[name]
        assert row.kernel == "gathered", name
        assert row.kept_macs <= row.computed_macs < row.dense_macs, name


def test_lowered_module_calls_sparse_kernels_instead_of_the_layers(tmp_path):
    from relay_passes import BlockedConvLayout, ClampCallTIRToOps

    model, mod = _pruned(small_cnn(tmp_path / "m.onnx"))
    spec = resolve_target("host")

    def lower(module):
        return tvm.transform.Sequential([
            tvm.relax.transform.FoldConstant(), ClampCallTIRToOps(),
            BlockedConvLayout(16), LowerToSparseKernels(spec)])(module)

    text = lower(mod).script()
    assert text.count("R.call_tir(cls.sparse_conv2d_nchwc") == 3
    assert text.count("R.call_tir(cls.sparse_dense") == 1
    assert [use.name for use in weight_uses(lower(mod)["main"])] == ["conv3.weight"]
    # the sparse convs read and write their neighbours' layouts: no transform is added
    dense_text = lower(import_onnx(model).mod).script()
    assert text.count("R.layout_transform(") <= dense_text.count("R.layout_transform(")


@pytest.mark.parametrize("case", [
    dict(kernel=3, stride=1, dilation=1, groups=1, bias=True, act="relu6"),
    dict(kernel=3, stride=2, dilation=1, groups=1, bias=False, act="relu"),
    dict(kernel=3, stride=1, dilation=2, groups=1, bias=True, act=None),
    dict(kernel=5, stride=1, dilation=1, groups=1, bias=True, act="relu"),
    dict(kernel=3, stride=1, dilation=1, groups=2, bias=True, act="relu"),
    dict(kernel=1, stride=2, dilation=1, groups=1, bias=True, act="relu6"),
    dict(kernel=3, stride=1, dilation=1, groups=1, bias=True, act="relu", pad=0),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_conv_option_lowers_and_matches(tmp_path, case):
    g = make_graph((1, 32, 10, 10))
    name = g.conv(32, kernel=case["kernel"], stride=case["stride"], dilation=case["dilation"],
                  groups=case["groups"], bias=case["bias"], pad=case.get("pad"))
    if case["act"] == "relu6":
        g.relu6()
    elif case["act"] == "relu":
        g.op("Relu")
    g.conv(16, kernel=1)                      # a dense neighbour, blocked
    path = g.save(tmp_path / "m.onnx")
    model = load_onnx(path)
    spec = (BlockBasedSpec(rate=3, block=(16, 4)) if case["kernel"] == 1
            else BlockPunchedSpec(rate=3, block=(16, 4)))
    mod = tvm.transform.Sequential([AnnotatePruning({"conv1.weight": spec}), ApplyPruning()])(
        import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    assert [row.kernel for row in rows] == ["gathered"], name


@pytest.mark.parametrize("transposed", [True, False], ids=["gemm", "matmul"])
def test_fc_and_matmul_weights_lower_and_match(tmp_path, transposed):
    g = make_graph((1, 64, 4, 4))
    g.flatten()
    g.gemm(40, transposed=transposed)        # 40 rows: a ragged last block of 16
    g.op("Relu")
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    mod = tvm.transform.Sequential([
        AnnotatePruning({"fc1.weight": BlockBasedSpec(rate=4, block=(16, 4))}),
        ApplyPruning()])(import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    assert [row.kernel for row in rows] == ["gathered"]


def test_a_block_not_dividing_the_filters_stays_dense_with_a_warning(tmp_path, caplog):
    g = make_graph((1, 16, 8, 8))
    g.conv(24)                                  # 24 filters, blocks of 16
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    mod = tvm.transform.Sequential([
        AnnotatePruning({"conv1.weight": BlockPunchedSpec(rate=2, block=(16, 4))}),
        ApplyPruning()])(import_onnx(model).mod)
    with caplog.at_level(logging.WARNING, logger="npas_tvm"):
        rows, _ = _lower_and_check(model, mod, tmp_path)
    assert rows[0].kernel is None and "24 output channels" in rows[0].reason
    assert "conv1.weight" in caplog.text


def test_sparse_model_builds_for_arm_cpu(tmp_path):
    from npas_tvm.compiler import library_kinds

    model, mod = _pruned(small_cnn(tmp_path / "m.onnx"))
    rows, executable = _lower_and_check(model, mod, tmp_path, target="arm-cpu")
    assert sum(row.kernel == "gathered" for row in rows) == 4
    assert "llvm" in library_kinds(executable)


def test_filter_pruning_removes_channels_and_matches(tmp_path):
    from npas_tvm.schemes import FilterSpec

    g = make_graph((1, 16, 8, 8))
    g.conv(32)
    g.relu6()
    g.conv(24, kernel=1)
    g.op("Relu")
    g.conv(24, kernel=3)
    g.flatten()
    g.gemm(10)
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    plan = {"conv1.weight": FilterSpec(rate=2), "conv2.weight": FilterSpec(rate=3),
            "conv3.weight": FilterSpec(rate=2)}
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    rows, executable = _lower_and_check(model, mod, tmp_path)
    by_name = {row.name: row for row in rows}
    assert [by_name[n].kernel for n in plan] == ["filters"] * 3
    # conv2 lost 2/3 of its filters and half of its input channels
    assert by_name["conv2.weight"].computed_macs * 6 == by_name["conv2.weight"].dense_macs


@pytest.mark.parametrize("head", ["conv", "fc"])
def test_filter_pruning_through_a_depthwise_conv_folds_its_constant_channels(tmp_path, head):
    """MobileNet's expand -> depthwise -> project: the expand conv's removed channels
    leave the depthwise conv too; their constant maps (its bias, clamped) are folded
    into the project layer's bias, so the result still matches the pruned model."""
    from npas_tvm.schemes import FilterSpec

    g = make_graph((1, 8, 9, 9))
    g.conv(24, kernel=1)
    g.relu6()
    g.conv(24, groups=24)
    g.relu6()
    if head == "conv":
        g.conv(16, kernel=1)
    else:
        g.op("GlobalAveragePool")
        g.flatten()
        g.gemm(10)
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    plan = {"conv1.weight": FilterSpec(rate=3)}
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    assert rows[0].kernel == "filters", rows[0].reason
    assert rows[0].computed_macs * 3 == rows[0].dense_macs


@pytest.mark.parametrize("pruned", [[], ["conv1.weight"], ["conv1.weight", "conv2.weight"]])
def test_filter_pruning_before_a_concat_cuts_the_matching_channels(tmp_path, pruned):
    """Two branches concatenated along channels: a pruned branch's removed channels keep
    their place in the concat, and the consumer loses exactly those input channels
    (both branches pruned: both sets, at their offsets). Unpruned, the branches' 16 and
    12 channels take different blocks, which Relax's ConvertLayout cannot concat: the
    layout pass falls back to one block for all convs."""
    from npas_tvm.schemes import FilterSpec

    g = make_graph((1, 8, 6, 6))
    g.conv(16)
    first = g.op("Relu")
    g.last, g.shape = "x", (1, 8, 6, 6)
    g.conv(12)
    g.op("Relu")
    g.op("Concat", first, axis=1)   # the second branch's channels come first
    g.shape = (1, 28, 6, 6)
    g.conv(10, kernel=1)
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    plan = {name: FilterSpec(rate=2) for name in pruned}
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    assert [row.kernel for row in rows] == ["filters"] * len(pruned)
    consumer = {"conv1.weight": 8, "conv2.weight": 6}  # removed input channels
    kept_inputs = 28 - sum(consumer[name] for name in pruned)
    shapes = {use.name: use.weight_shape for use in weight_uses(RemoveFilters()(mod)["main"])}
    assert shapes["conv3.weight"][1] == kept_inputs


def test_filter_pruning_before_a_residual_add_keeps_the_zero_filters(tmp_path, caplog):
    from npas_tvm.schemes import FilterSpec

    g = make_graph((1, 16, 8, 8))
    g.conv(16)
    skip = g.op("Relu")
    g.conv(16)
    g.op("Add", skip)
    model = load_onnx(g.save(tmp_path / "m.onnx"))
    mod = tvm.transform.Sequential([
        AnnotatePruning({"conv2.weight": FilterSpec(rate=2)}), ApplyPruning()])(
        import_onnx(model).mod)
    with caplog.at_level(logging.WARNING, logger="npas_tvm"):
        rows, _ = _lower_and_check(model, mod, tmp_path)
    assert rows[0].kernel is None and "residual add" in rows[0].reason
    assert "conv2.weight" in caplog.text
