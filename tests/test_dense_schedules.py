"""The dense CPU path: each scheduled op family against onnxruntime, x86 run, arm built.

Every case is a one- or two-op ONNX graph compiled through ``compiler.build`` (the
whole pipeline: blocked layouts, legalization, fusion, schedules) and compared with
onnxruntime; the test also checks that the kernel got the intended schedule, so a
silent fallback to TVM's unscheduled legalization would fail it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from npas_tvm.runtime import REL_TOLERANCE, TVMRunner, compare, ort_session

EM_AARCH64 = 183


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "case", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def conv_model(cin, cout, size, kernel, stride=1, pad=None, dilation=1, groups=1,
               relu6=True, residual=False, seed=0):
    """Conv (+bias) (+ReLU6 as Clip with min/max inputs) (+residual add)."""
    rng = np.random.default_rng(seed)
    pad = (kernel // 2) * dilation if pad is None else pad
    weight = rng.standard_normal((cout, cin // groups, kernel, kernel)).astype("float32")
    bias = rng.standard_normal(cout).astype("float32")
    height, width = size if isinstance(size, tuple) else (size, size)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array(0, "float32"), "lo"),
             numpy_helper.from_array(np.array(6, "float32"), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kernel, kernel],
                              strides=[stride, stride], pads=[pad] * 4,
                              dilations=[dilation, dilation], group=groups)]
    out = "y"
    if relu6:
        nodes.append(helper.make_node("Clip", [out, "lo", "hi"], ["r"]))
        out = "r"
    if residual:
        nodes.append(helper.make_node("Add", [out, "x"], ["s"]))
        out = "s"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, height, width])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    return _model(nodes, [x], [y], inits)


def single_op_model(op, in_shape, weights=(), **attrs):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), f"p{i}")
             for i, shape in enumerate(weights)]
    node = helper.make_node(op, ["x", *[f"p{i}" for i in range(len(weights))]], ["y"], **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([node], [x], [y], inits)


CONV_CASES = {
    # name: (conv_model kwargs, the kernel family expected to be scheduled)
    "1x1": (dict(cin=32, cout=64, size=14, kernel=1), "conv2d_nchwc"),
    "1x1_stride2_odd": (dict(cin=24, cout=40, size=15, kernel=1, stride=2), "conv2d_nchwc"),
    "3x3_residual": (dict(cin=32, cout=32, size=13, kernel=3, residual=True), "conv2d_nchwc"),
    "3x3_stride2_odd": (dict(cin=16, cout=48, size=17, kernel=3, stride=2), "conv2d_nchwc"),
    "5x5": (dict(cin=8, cout=16, size=11, kernel=5), "conv2d_nchwc"),
    "7x7_stride2_rgb": (dict(cin=3, cout=16, size=33, kernel=7, stride=2), "conv2d_nchwc"),
    "3x3_dilation2": (dict(cin=16, cout=16, size=20, kernel=3, dilation=2), "conv2d_nchwc"),
    "3x3_no_pad_rect": (dict(cin=16, cout=24, size=(9, 14), kernel=3, pad=0), "conv2d_nchwc"),
    "grouped_3x3": (dict(cin=64, cout=64, size=10, kernel=3, groups=4), "conv2d_nchwc"),
    "depthwise_3x3": (dict(cin=72, cout=72, size=14, kernel=3, groups=72), "depthwise"),
    "depthwise_3x3_stride2_odd": (dict(cin=24, cout=24, size=15, kernel=3, stride=2,
                                       groups=24), "depthwise"),
    "depthwise_5x5_stride2": (dict(cin=40, cout=40, size=14, kernel=5, stride=2, groups=40),
                              "depthwise"),
    "depthwise_7x7": (dict(cin=16, cout=16, size=9, kernel=7, groups=16), "depthwise"),
    # Channels no block divides: TVM's default legalization, still correct.
    "odd_channels_fallback": (dict(cin=10, cout=6, size=8, kernel=3), None),
}

OP_CASES = {
    "dense": (single_op_model("Gemm", (1, 200), weights=[(1000, 200), (1000,)], transB=1),
              "matmul"),
    "maxpool_3x3_stride2": (single_op_model("MaxPool", (1, 64, 15, 15), kernel_shape=[3, 3],
                                            strides=[2, 2], pads=[1, 1, 1, 1]), "pool"),
    "avgpool_2x2": (single_op_model("AveragePool", (1, 32, 8, 8), kernel_shape=[2, 2],
                                    strides=[2, 2]), "pool"),
    "global_avgpool": (single_op_model("GlobalAveragePool", (1, 96, 7, 7)), ""),
    "hardswish": (single_op_model("HardSwish", (1, 40, 9, 9)), ""),
}


def _scheduled_kernels(mod) -> list[str]:
    import tvm

    return [gvar.name_hint for gvar, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
            and func.attrs.get("tirx.is_scheduled", False)]


def _lowered(onnx_model, target: str):
    """(spec, the module after the dense CPU passes, the built executable)."""
    import tempfile

    import onnx
    import tvm

    from npas_tvm.compiler import bind_params, build, import_onnx
    from npas_tvm.model_io import load_onnx
    from relay_passes import dense_cpu_passes
    from npas_tvm.targets import resolve_target

    spec = resolve_target(target)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(onnx_model, f"{tmp}/case.onnx")
        model = load_onnx(f"{tmp}/case.onnx")
    mod = bind_params(import_onnx(model))
    with spec.tvm_target:
        lowered = tvm.transform.Sequential(dense_cpu_passes(spec))(mod)
    return model, lowered, build(mod, spec)


def _check_host(onnx_model, expected_kernel):
    model, lowered, executable = _lowered(onnx_model, "host")
    scheduled = _scheduled_kernels(lowered)
    if expected_kernel:
        assert any(expected_kernel in name for name in scheduled), scheduled
    inputs = model.random_inputs(seed=3)
    result = compare(TVMRunner(executable, list(model.input_shapes)).run(inputs),
                     ort_session(model.proto).run(None, inputs))
    assert result.max_rel <= REL_TOLERANCE, str(result)
    return scheduled


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_onnxruntime(case):
    kwargs, kernel = CONV_CASES[case]
    scheduled = _check_host(conv_model(**kwargs), kernel)
    if kernel:  # bias and ReLU6 are fused into the conv kernel
        conv = [name for name in scheduled if kernel in name]
        assert any("minimum" in name for name in conv), conv


@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_onnxruntime(case):
    onnx_model, kernel = OP_CASES[case]
    scheduled = _check_host(onnx_model, kernel)
    assert scheduled, "nothing was scheduled"


@pytest.mark.parametrize("case", ["3x3_residual", "depthwise_3x3_stride2_odd",
                                  "7x7_stride2_rgb", "grouped_3x3"])
def test_arm_cpu_builds_an_aarch64_object(case, tmp_path):
    import tarfile

    kwargs, kernel = CONV_CASES[case]
    _, lowered, executable = _lowered(conv_model(**kwargs), "arm-cpu")
    assert any(kernel in name for name in _scheduled_kernels(lowered))
    path = str(tmp_path / "lib.tar")
    executable.export_library(path)  # objects only: no cross linker needed
    with tarfile.open(path) as archive:
        objects = [m for m in archive.getmembers() if m.name.endswith(".o")]
        header = archive.extractfile(objects[0]).read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_arm_uses_neon_blocks():
    """Blocks follow the target's SIMD width: 4 fp32 on NEON, the host's width on x86."""
    from npas_tvm.targets import resolve_target
    from tir_schedules import default_config

    arm = default_config(resolve_target("arm-cpu"))
    host = resolve_target("host")
    assert arm.lanes == 4 and arm.family == "arm"
    assert default_config(host).lanes == max(host.simd_lanes, 4)
    _, lowered, _ = _lowered(conv_model(32, 32, 8, 3), "arm-cpu")
    assert "NCHW4c" in lowered["main"].script(show_meta=False) or any(
        "conv2d_nchwc" in name for name in _scheduled_kernels(lowered))


def test_register_tile_fits_the_registers():
    from tir_schedules.common import choose_register_tile

    for registers in (16, 32):
        for blocks, width in [(16, 28), (8, 56), (4, 7), (32, 14), (1, 112), (3, 13)]:
            c, w = choose_register_tile(blocks, width, registers, 4, 8)
            assert blocks % c == 0 and width % w == 0
            assert c * w + c + 1 <= registers


def test_channel_block():
    from relay_passes.layout import channel_block

    assert channel_block(64, 16) == 16
    assert channel_block(24, 16) == 8
    assert channel_block(72, 8) == 8
    assert channel_block(12, 16) == 4
    assert channel_block(6, 16) is None
