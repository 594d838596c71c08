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


# ------------------------------------------------------------------ sparse kernels


def _sparse_on_pocl(path, plan, target, tmp_path, stage_input="auto"):
    """Prune ``path`` by ``plan``, lower for ``target`` with npas-tvm's GPU pipeline, run
    on PoCL; returns (lowered layers, runner, comparison against the pruned ONNX)."""
    import tvm

    from npas_tvm.model_io import load_onnx
    from npas_tvm.sparse_compile import write_pruned_onnx
    from relay_passes import AnnotatePruning, ApplyPruning
    from relay_passes.gpu import gpu_pipeline
    from relay_passes.weights import attached_params

    model = load_onnx(path)
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    pruned = write_pruned_onnx(model, attached_params(mod["main"]),
                               str(tmp_path / "pruned.onnx"))
    spec, rows = resolve_target(target), []
    runner = OpenCLModel(mod, spec.tvm_target, gpu_pipeline(spec, rows.append, stage_input))
    inputs = pruned.random_inputs(seed=1)
    result = compare(runner.run(list(inputs.values())), run_onnxruntime(pruned.proto, inputs))
    return rows, runner, result


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_sparse_kernels_run_on_pocl_and_match(tmp_path, target):
    from onnx_graphs import small_cnn
    from test_npas_passes import PLAN

    rows, runner, result = _sparse_on_pocl(small_cnn(tmp_path / "m.onnx"), PLAN, target,
                                           tmp_path)
    assert result.ok, f"{target}: {result.report()}"
    assert sum(row.kernel == "gathered" for row in rows) == 4
    sparse = [k for name, k in runner.kernels.items() if "sparse" in name]
    assert len(sparse) == 4 and all(k.local_size[0] <= 256 for k in sparse)
    assert "__kernel void" in runner.source and "sparse_conv2d_nchwc" in runner.source


@pytest.mark.parametrize("case", [
    dict(kernel=3, stride=2, dilation=1, groups=1, rate=5, block=(8, 4)),
    dict(kernel=3, stride=1, dilation=2, groups=2, rate=3, block=(16, 4)),
    dict(kernel=5, stride=1, dilation=1, groups=1, rate=10, block=(4, 4)),
    dict(kernel=1, stride=1, dilation=1, groups=1, rate=2, block=(16, 8)),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""))
def test_sparse_conv_options_on_pocl(tmp_path, case):
    from onnx_graphs import make_graph

    from npas_tvm.schemes import BlockBasedSpec, BlockPunchedSpec

    g = make_graph((1, 32, 9, 9))
    g.conv(32, kernel=case["kernel"], stride=case["stride"], dilation=case["dilation"],
           groups=case["groups"])
    g.op("Relu")
    spec_type = BlockBasedSpec if case["kernel"] == 1 else BlockPunchedSpec
    plan = {"conv1.weight": spec_type(rate=case["rate"], block=case["block"])}
    rows, _, result = _sparse_on_pocl(g.save(tmp_path / "m.onnx"), plan, "mali", tmp_path)
    assert [row.kernel for row in rows] == ["gathered"]
    assert result.ok, result.report()


def _local_tiles(runner) -> list[str]:
    """The ``__local`` arrays of the sparse kernels' sources."""
    import re

    return re.findall(r"__local float (\w+)\[(\d+)\]", runner.source)


@pytest.mark.parametrize("case", [
    dict(cin=64, cout=64, size=14, kernel=3, stride=1, rate=3, block=(16, 4)),
    dict(cin=32, cout=64, size=9, kernel=3, stride=2, rate=5, block=(8, 4)),
    dict(cin=48, cout=32, size=7, kernel=1, stride=1, rate=5, block=(16, 8)),
    dict(cin=24, cout=64, size=10, kernel=1, stride=1, rate=3, block=(4, 4)),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""))
@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_staged_input_tile_matches_unstaged(tmp_path, case, target):
    """Both variants of the gathered-tap conv (input tile staged in __local memory or
    read from global memory) match onnxruntime; the staged one holds one tap chunk
    (work-group pixels x stage_taps floats), with a bias and ReLU epilogue fused."""
    from onnx_graphs import make_graph

    from npas_tvm.schemes import BlockBasedSpec, BlockPunchedSpec

    g = make_graph((1, case["cin"], case["size"], case["size"]))
    g.conv(case["cout"], kernel=case["kernel"], stride=case["stride"], bias=True)
    g.op("Relu")
    spec_type = BlockBasedSpec if case["kernel"] == 1 else BlockPunchedSpec
    plan = {"conv1.weight": spec_type(rate=case["rate"], block=case["block"])}
    tiles = {}
    for stage in (False, True):
        rows, runner, result = _sparse_on_pocl(g.save(tmp_path / f"m{stage}.onnx"), plan,
                                               target, tmp_path, stage_input=stage)
        assert [row.kernel for row in rows] == ["gathered"]
        assert result.ok, f"stage_input={stage}: {result.report()}"
        tiles[stage] = _local_tiles(runner)
    assert tiles[False] == []
    (name, size), = tiles[True]
    assert "reindex" in name and int(size) <= 64 * 16


@pytest.mark.parametrize("device, layer, scheme, staged", [
    ("adreno", ("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "block_punched", True),
    ("mali", ("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "block_punched", False),
    ("adreno", ("conv1x1 32->64 @8", "conv", 32, 64, 8, 1), "block_based", False),
    ("adreno", ("fc 64->40", "fc", 64, 40, 1, 1), "block_based", False),
], ids=lambda v: v if isinstance(v, (str, bool)) else v[0].replace(" ", "_"))
def test_auto_stages_the_padded_convs_on_adreno(tmp_path, device, layer, scheme, staged):
    """The default rule (tir_schedules.sparse_gpu.stage_input_pays): staged where the
    conv zero-pads its input, on Adreno; never on Mali, 1x1 convs or the GEMM."""
    from benchmarks.opencl_proxy import measure

    row = measure(layer, scheme, 4.0, device, str(tmp_path))
    assert row["ok"] and row["staged"] is staged, row


def test_stage_input_knob_reaches_the_schedule():
    from relay_passes.gpu import ScheduleSparseGPU
    from tir_schedules.sparse_gpu import GpuScheduleConfig

    config = GpuScheduleConfig(128, "adreno", True, stage_taps=8)
    assert ScheduleSparseGPU(config=config).config == config
    assert ScheduleSparseGPU(64).config.stage_input == "auto"


def test_compile_npas_for_mali_lowers_to_sparse_kernels(zoo_onnx, tmp_path, capsys):
    from npas_tvm.cli import main

    code = main(["compile", zoo_onnx("vgg_cifar"), "--target", "mali", "--npas",
                 "-o", str(tmp_path / "v.so")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "gathered" in out and "Traceback" not in err


@pytest.mark.parametrize("device", ["mali", "adreno"])
@pytest.mark.parametrize("layer, scheme", [
    (("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "block_punched"),
    (("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "pattern"),
    (("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "unstructured"),
    (("conv1x1 32->64 @8", "conv", 32, 64, 8, 1), "block_based"),
    (("conv1x1 32->64 @8", "conv", 32, 64, 8, 1), "unaligned_block"),
    (("conv1x1 32->18 @8", "conv", 32, 18, 8, 1), "unaligned_block"),  # no vector tiles
    (("fc 64->40", "fc", 64, 40, 1, 1), "block_based"),
    (("fc 64->40", "fc", 64, 40, 1, 1), "unstructured"),
], ids=lambda v: v if isinstance(v, str) else v[0].replace(" ", "_"))
def test_every_sparse_kernel_runs_on_both_devices(tmp_path, layer, scheme, device):
    """Each scheme's kernel lowers for the device (no dense fallback) and matches."""
    from benchmarks.opencl_proxy import measure

    row = measure(layer, scheme, 4.0, device, str(tmp_path))
    assert row is not None, f"{scheme} fell back to dense on {device}"
    assert row["ok"] and 0 < row["work_group"] <= 256, row


def test_proxy_table_row_reports_work_traffic_and_intensity(tmp_path):
    from benchmarks.opencl_proxy import measure

    row = measure(("conv3x3 32->32 @8", "conv", 32, 32, 8, 3), "block_punched", 4.0,
                  "adreno", str(tmp_path))
    assert row["ok"] and row["work_items"] >= 32 * 8 * 8 // 4
    assert 0 < row["work_group"] <= 256
    # the kept weights' work: 32x32x9 weights / 4, 64 pixels, 2 flops per MAC (+- padding)
    assert abs(row["mflop"] - 2 * 32 * 32 * 9 / 4 * 64 / 1e6) < 0.02
    assert row["kb_moved"] > 8 and row["flop_per_byte"] == pytest.approx(
        row["mflop"] * 1e6 / (row["kb_moved"] * 1e3))


def _zoo_sparse_on_pocl(zoo_onnx, name, target, tmp_path):
    from npas_tvm.layers import extract_layers
    from npas_tvm.model_io import load_onnx
    from search.rule_mapper import RuleTarget, rule_plan

    path = zoo_onnx(name)
    plan = rule_plan(extract_layers(load_onnx(path).proto), 3.0,
                     RuleTarget.for_spec(resolve_target(target)))
    return _sparse_on_pocl(path, plan, target, tmp_path)


@pytest.mark.parametrize("name, target", [("vgg_cifar", "mali"), ("vgg_cifar", "adreno"),
                                          ("mobilenet_v2", "adreno")])
def test_zoo_model_with_npas_runs_on_pocl_end_to_end(zoo_onnx, tmp_path, name, target):
    rows, runner, result = _zoo_sparse_on_pocl(zoo_onnx, name, target, tmp_path)
    assert result.ok, f"{name} on {target}: {result.report()}"
    assert sum(row.kernel is not None for row in rows) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mali", "adreno"])
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "resnet18"])
def test_zoo_models_compile_with_npas_for_gpus(zoo_onnx, tmp_path, capsys, name, target):
    from npas_tvm.cli import main
    from npas_tvm.compiler import opencl_source

    code = main(["compile", zoo_onnx(name), "--target", target, "--npas",
                 "-o", str(tmp_path / f"{name}.so")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "Traceback" not in err and out.count(" gathered ") + out.count(" filters ") > 3
