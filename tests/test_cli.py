"""The command line: each user mistake gets one clear line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from npas_tvm.cli import main


def conv_model(path, input_dims, op="Conv"):
    """One Conv (3->8, 3x3) with named nodes; ``op`` swaps in another op type."""
    weight = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "conv.weight")
    inputs = ["input", "conv.weight"] if op == "Conv" else ["input"]
    node = helper.make_node(op, inputs, ["out"], name="conv1" if op == "Conv" else "odd1")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [weight] if op == "Conv" else [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("npas-tvm: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture()
def dynamic_conv(tmp_path):
    return conv_model(tmp_path / "dyn.onnx", ["N", "C", "H", "W"])


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(["compile", str(tmp_path / "nope.onnx"), "-o", "x.so"], capsys)
    assert_one_line_error(code, err, "nope.onnx", "no such file")


def test_not_onnx(capsys, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are not the weights you are looking for\n")
    code, _, err = run_cli(["compile", str(bad), "-o", "x.so"], capsys)
    assert_one_line_error(code, err, "notes.onnx", "not a valid ONNX model")


def test_op_the_frontend_cannot_import(capsys, tmp_path):
    path = conv_model(tmp_path / "dft.onnx", [1, 3, 8, 8], op="DFT")
    code, _, err = run_cli(["compile", path, "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "dft.onnx", "'odd1'", "DFT")


def test_shape_that_does_not_fit_names_the_node(capsys, tmp_path, dynamic_conv):
    code, _, err = run_cli(["compile", dynamic_conv, "--input-shape", "input=1,4,16,16",
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "dyn.onnx", "'conv1'", "channel")


@pytest.mark.parametrize("shape_flag,fragment", [
    ("input=1,3,16", "rank 4"),
    ("image=1,3,16,16", "'image'"),
    ("input=1,3,x,16", "--input-shape"),
    ("input=1,0,16,16", "--input-shape"),
])
def test_bad_input_shape_flag(capsys, tmp_path, dynamic_conv, shape_flag, fragment):
    code, _, err = run_cli(["compile", dynamic_conv, "--input-shape", shape_flag,
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, fragment)


def test_dynamic_dim_without_shape(capsys, tmp_path, dynamic_conv):
    code, _, err = run_cli(["compile", dynamic_conv, "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "dim 1 (C) is dynamic", "--input-shape input=")


def test_fixed_dim_conflict(capsys, tmp_path):
    path = conv_model(tmp_path / "fixed.onnx", [1, 3, 16, 16])
    code, _, err = run_cli(["compile", path, "--input-shape", "input=1,4,16,16",
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "dim 1 is fixed to 3")


@pytest.mark.parametrize("target,fragment", [
    ("bogus", "unknown target"),
    ('{"kind": "llvm", "mcpu": ', "invalid JSON"),
    ('{"kind": "llvmx"}', "TVM rejected"),
])
def test_bad_target(capsys, tmp_path, dynamic_conv, target, fragment):
    code, _, err = run_cli(["compile", dynamic_conv, "--target", target,
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "--target", fragment)


def test_check_needs_host(capsys, tmp_path, dynamic_conv):
    code, _, err = run_cli(["compile", dynamic_conv, "--target", "arm-cpu", "--check",
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "--check", "host")


def test_bad_output_suffix(capsys, tmp_path):
    path = conv_model(tmp_path / "fixed.onnx", [1, 3, 16, 16])
    code, _, err = run_cli(["compile", path, "-o", str(tmp_path / "x.bin")], capsys)
    assert_one_line_error(code, err, "x.bin", ".so or .tar")


def test_missing_cross_linker(capsys, tmp_path):
    path = conv_model(tmp_path / "fixed.onnx", [1, 3, 16, 16])
    code, _, err = run_cli(["compile", path, "--target", "arm-cpu", "--cc", "no-such-gcc",
                            "-o", str(tmp_path / "x.so")], capsys)
    assert_one_line_error(code, err, "no-such-gcc", "not found")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["compile", str(tmp_path / "nope.onnx"), "-o", "x.so", "--debug"])


def test_check_passes_and_reports_errors(capsys, tmp_path):
    path = conv_model(tmp_path / "fixed.onnx", [1, 3, 16, 16])
    code, out, _ = run_cli(["compile", path, "-o", str(tmp_path / "ok.so"), "--check"], capsys)
    assert code == 0
    assert "max rel err" in out and "OK" in out


def test_targets_lists_the_table_and_the_cpu(capsys):
    from npas_tvm.targets import TARGETS, detect_host_cpu

    code, out, _ = run_cli(["targets"], capsys)
    assert code == 0
    for name in TARGETS:
        assert name in out
    cpu = detect_host_cpu()
    assert f"mcpu={cpu.llvm_cpu}" in out and f"{cpu.fp32_lanes} fp32 lanes" in out


def test_host_cpu_detection_agrees_with_cpuinfo():
    from tvm.target import Target, codegen

    from npas_tvm.targets import _cpuinfo, detect_host_cpu

    cpu = detect_host_cpu()
    _, flags = _cpuinfo()
    if "avx512f" in flags:
        assert cpu.fp32_lanes == 16
    elif "avx2" in flags:
        assert cpu.fp32_lanes == 8
    assert cpu.llvm_cpu != "generic"
    known = codegen.llvm_get_cpu_archlist(Target("llvm"))
    assert cpu.llvm_cpu in known, f"LLVM would silently ignore mcpu={cpu.llvm_cpu}"
    if cpu.simd in ("avx2", "avx512"):
        assert codegen.llvm_cpu_has_features(["avx2", "fma"],
                                             Target({"kind": "llvm", "mcpu": cpu.llvm_cpu}))


def test_zoo_list_and_export(capsys, tmp_path):
    from npas_tvm.zoo import ZOO_NAMES

    code, out, _ = run_cli(["zoo", "list"], capsys)
    assert code == 0 and all(name in out for name in ZOO_NAMES)
    path = tmp_path / "vgg.onnx"
    assert run_cli(["zoo", "export", "vgg_cifar", "-o", str(path)], capsys)[0] == 0
    names = {init.name for init in onnx.load(str(path)).graph.initializer}
    assert "features.0.weight" in names and "classifier.weight" in names
    assert not any(name.startswith("onnx::") for name in names)
    code, _, err = run_cli(["zoo", "export", "alexnet", "-o", str(path)], capsys)
    assert_one_line_error(code, err, "alexnet")


def test_zoo_export_is_deterministic(tmp_path):
    from npas_tvm.zoo import export_zoo_model

    first = onnx.load(export_zoo_model("vgg_cifar", str(tmp_path / "a.onnx")))
    second = onnx.load(export_zoo_model("vgg_cifar", str(tmp_path / "b.onnx")))
    for a, b in zip(first.graph.initializer, second.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_console_script_runs(tmp_path):
    """The installed entry point, as a user types it."""
    result = subprocess.run([sys.executable, "-m", "npas_tvm", "compile",
                             str(tmp_path / "nope.onnx"), "-o", "x.so"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
