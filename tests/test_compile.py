"""Compiling ONNX models for every target: numerics vs onnxruntime and artifact kinds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from npas_tvm.compiler import export, library_kinds, opencl_source
from npas_tvm.runtime import REL_TOLERANCE, TVMRunner, compare, run_onnxruntime
from npas_tvm.zoo import ZOO_NAMES

EM_AARCH64 = 183


def elf_machine(path: str) -> int:
    with open(path, "rb") as fh:
        header = fh.read(20)
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_on_host_matches_onnxruntime(compiled, name):
    model, _, library = compiled(name, "host")
    inputs = model.random_inputs(seed=1)
    # The exported .so, loaded afresh, is what users run.
    result = compare(TVMRunner(library, list(model.input_shapes)).run(inputs),
                     run_onnxruntime(model.proto, inputs))
    assert result.max_rel <= REL_TOLERANCE, f"{name}: {result}"


def test_outputs_are_not_trivially_equal(compiled):
    """The numerics check would pass for a constant output; make sure it is not one."""
    model, _, library = compiled("vgg_cifar", "host")
    runner = TVMRunner(library, list(model.input_shapes))
    first = runner.run(model.random_inputs(seed=1))[0]
    second = runner.run(model.random_inputs(seed=2))[0]
    assert np.abs(first - second).max() > 1e-3 * np.abs(first).max()


def test_arm_cpu_library_is_an_aarch64_object(compiled):
    _, executable, library = compiled("vgg_cifar", "arm-cpu")
    assert elf_machine(library) == EM_AARCH64
    assert "llvm" in library_kinds(executable)


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_gpu_library_contains_opencl_kernels(compiled, target):
    _, executable, library = compiled("vgg_cifar", target)
    assert "opencl" in library_kinds(executable)
    source = opencl_source(executable)
    assert source.count("__kernel") >= 5  # convs, pools, the classifier
    assert "conv2d" in source
    assert elf_machine(library) == EM_AARCH64  # the host side runs on the phone's CPU


def test_json_target(zoo_onnx, tmp_path):
    from npas_tvm.compiler import compile_model
    from npas_tvm.model_io import load_onnx
    from npas_tvm.targets import resolve_target

    spec = resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", '
                          '"mcpu": "cortex-a76", "mattr": ["+neon"]}')
    assert spec.cross_compiler == "aarch64-linux-gnu-gcc" and not spec.runs_on_host
    library = export(compile_model(load_onnx(zoo_onnx("vgg_cifar")), spec),
                     str(tmp_path / "a76.so"), spec)
    assert elf_machine(library) == EM_AARCH64


def test_tar_export_needs_no_linker(compiled, tmp_path):
    from npas_tvm.targets import resolve_target

    _, executable, _ = compiled("vgg_cifar", "arm-cpu")
    path = export(executable, str(tmp_path / "m.tar"), resolve_target("arm-cpu"))
    import tarfile

    assert any(name.endswith(".o") for name in tarfile.open(path).getnames())


def _tiny_torch_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.Hardswish(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("opset", range(13, 22))
def test_opsets_13_to_21_load(tmp_path, opset):
    from npas_tvm.compiler import compile_model
    from npas_tvm.model_io import load_onnx
    from npas_tvm.targets import resolve_target
    from npas_tvm.zoo import export_onnx

    path = str(tmp_path / "tiny.onnx")
    export_onnx(_tiny_torch_model(), path, (1, 3, 16, 16), opset=min(opset, 17))
    if opset > 17:
        converted = onnx.version_converter.convert_version(onnx.load(path), opset)
        onnx.save(converted, path)
    model = load_onnx(path)
    assert model.opset == opset
    executable = compile_model(model, resolve_target("host"))
    inputs = model.random_inputs()
    result = compare(TVMRunner(executable, ["input"]).run(inputs),
                     run_onnxruntime(model.proto, inputs))
    assert result.ok, result


def test_external_data_and_dynamic_batch(tmp_path):
    from npas_tvm.cli import main
    from npas_tvm.zoo import export_onnx

    path = str(tmp_path / "ext.onnx")
    export_onnx(_tiny_torch_model(), path, (1, 3, 16, 16), dynamic_batch=True)
    proto = onnx.load(path)
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    assert (tmp_path / "ext.weights").exists()
    assert not onnx.load(path, load_external_data=False).graph.initializer[0].raw_data
    # Distinct outputs: dlopen would hand back the first library for a reused path.
    assert main(["compile", path, "-o", str(tmp_path / "b3.so"),
                 "--input-shape", "input=3,3,16,16", "--check"]) == 0
    assert main(["compile", path, "-o", str(tmp_path / "b1.so"), "--check"]) == 0  # batch 1
