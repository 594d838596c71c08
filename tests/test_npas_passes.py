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
from onnx import TensorProto, helper, numpy_helper

from npas_tvm.compiler import build, import_onnx
from npas_tvm.model_io import load_onnx
from npas_tvm.runtime import TVMRunner, compare, run_onnxruntime
from npas_tvm.schemes import (BlockBasedSpec, BlockPunchedSpec, PatternSpec, make_mask,
                              satisfies)
from npas_tvm.sparse_compile import write_pruned_onnx
from npas_tvm.targets import resolve_target
from relay_passes import (AnnotatePruning, ApplyPruning, DetectSparsity,
                          LowerToSparseKernels)
from relay_passes.weights import attached_params, pruning_annotations, weight_uses


class Graph:
    """A tiny ONNX graph builder: conv / gemm / elementwise nodes with random weights."""

    def __init__(self, shape, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.shape = [], [], shape
        self.last, self.count, self.layers = "x", 0, 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _layer(self, prefix: str) -> str:
        self.layers += 1
        return f"{prefix}{self.layers}"

    def weight(self, name: str, shape) -> str:
        value = (self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype("float32")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
             groups: int = 1, bias: bool = True, pad: int | None = None) -> str:
        in_channels = self.shape[1]
        name = self._layer("conv")
        inputs = [self.last, self.weight(f"{name}.weight",
                                         (out_channels, in_channels // groups, kernel, kernel))]
        if bias:
            inputs.append(self.weight(f"{name}.bias", (out_channels,)))
        pad = dilation * (kernel // 2) if pad is None else pad
        out = self._name("t")
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], kernel_shape=[kernel, kernel], strides=[stride, stride],
            dilations=[dilation, dilation], pads=[pad] * 4, group=groups))
        n, _, h, w = self.shape
        size = lambda s: (s + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1  # noqa: E731
        self.shape = (n, out_channels, size(h), size(w))
        self.last = out
        return out

    def op(self, op_type: str, *extra, **attrs) -> str:
        out = self._name("t")
        self.nodes.append(helper.make_node(op_type, [self.last, *extra], [out], **attrs))
        self.last = out
        return out

    def relu6(self) -> str:
        low, high = self._name("lo"), self._name("hi")
        self.inits += [numpy_helper.from_array(np.array(0, "float32"), low),
                       numpy_helper.from_array(np.array(6, "float32"), high)]
        return self.op("Clip", low, high)

    def flatten(self) -> str:
        self.op("GlobalAveragePool")
        out = self.op("Flatten")
        self.shape = (self.shape[0], self.shape[1])
        return out

    def gemm(self, out_features: int, transposed: bool = True) -> str:
        name = self._layer("fc")
        k = self.shape[1]
        if transposed:
            weight = self.weight(f"{name}.weight", (out_features, k))
            out = self.op("Gemm", weight, self.weight(f"{name}.bias", (out_features,)),
                          transB=1)
        else:
            out = self.op("MatMul", self.weight(f"{name}.weight", (k, out_features)))
        self.shape = (self.shape[0], out_features)
        return out

    def save(self, path) -> str:
        import onnx

        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [1, *self.input_shape[1:]])],
            [helper.make_tensor_value_info(self.last, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, str(path))
        return str(path)


def make_graph(shape=(1, 16, 12, 12)) -> Graph:
    graph = Graph(shape)
    graph.input_shape = shape
    return graph


def small_cnn(path) -> str:
    """conv3x3 -> relu6 -> conv1x1 (+ residual) -> depthwise -> conv3x3/2 -> fc."""
    g = make_graph()
    g.conv(32)
    skip = g.relu6()
    g.conv(32, kernel=1)
    g.op("Add", skip)
    g.conv(32, groups=32)
    g.op("Relu")
    g.conv(64, stride=2, bias=False)
    g.flatten()
    g.gemm(24)
    return g.save(path)


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
