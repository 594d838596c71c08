"""Generated Mali/Adreno OpenCL, run on PoCL and compared with onnxruntime."""

from __future__ import annotations

import pytest

from npas_tvm.compiler import bind_params, import_onnx
from npas_tvm.opencl_runner import OpenCLModel
from npas_tvm.runtime import REL_TOLERANCE, compare, run_onnxruntime
from npas_tvm.targets import resolve_target


def test_pocl_is_an_opencl_platform():
    import pyopencl as cl

    names = [platform.name for platform in cl.get_platforms()]
    assert any("Portable Computing Language" in name for name in names), names


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_whole_model_opencl_matches_onnxruntime(zoo_onnx, target):
    from npas_tvm.model_io import load_onnx

    model = load_onnx(zoo_onnx("vgg_cifar"))
    runner = OpenCLModel(bind_params(import_onnx(model)), resolve_target(target).tvm_target)
    assert len(runner.kernels) >= 10
    assert all(k.local_size[0] >= 1 and k.work_items > 0 for k in runner.kernels.values())
    inputs = model.random_inputs(seed=3)
    result = compare(runner.run([inputs["input"]]), run_onnxruntime(model.proto, inputs))
    assert result.max_rel <= REL_TOLERANCE, f"{target}: {result}"


def test_wrong_local_size_is_never_used():
    """Launch grids come from the thread bindings: local = threadIdx, global = blocks x threads."""
    from npas_tvm.opencl_runner import _ndrange

    global_size, local_size = _ndrange({"blockIdx.x": 4, "threadIdx.x": 8, "threadIdx.y": 2})
    assert local_size == (8, 2, 1) and global_size == (32, 2, 1)
