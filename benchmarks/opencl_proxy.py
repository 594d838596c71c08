"""Mali / Adreno sparse kernels: a proxy table, since PoCL timings are not GPU timings.

    python benchmarks/opencl_proxy.py --json opencl_proxy.json
    python benchmarks/opencl_proxy.py --devices mali --rates 5

For each benchmark layer, pruning rate and scheme with an OpenCL kernel, the layer is
pruned, lowered with npas-tvm's GPU pipeline for each device, run on PoCL and checked
against onnxruntime on the pruned weights; the table gives what a GPU's speed depends on:
the kernel's work-items and work-group size, its floating-point work (the kept weights'
multiply-adds, as executed), the bytes of the buffers it reads and writes (compulsory
traffic) and their ratio, the arithmetic intensity, and whether the kernel stages its
input tile in ``__local`` memory (which cuts the global loads it issues, not the
compulsory traffic; see ``benchmarks/opencl_staging.py``). Real timings need a phone:
`npas-tvm bench OUT.so --rpc-tracker ... --rpc-key ... --device opencl`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, kind, in channels, out channels, input size, kernel): those of benchmarks/kernels.py
from benchmarks.kernels import LAYERS  # noqa: E402

SCHEMES = {"conv1x1": ("block_based", "unaligned_block", "unstructured"),
           "fc": ("block_based", "unaligned_block", "unstructured"),
           "conv3x3": ("block_punched", "pattern", "unstructured")}


def layer_onnx(kind: str, cin: int, cout: int, size: int, kernel: int, path: str) -> str:
    """The layer as a one-op ONNX model (``benchmarks/kernels.py``'s) with a random weight."""
    import numpy as np
    import onnx

    from benchmarks.kernels import ort_model

    rng = np.random.default_rng(0)
    shape = (cout, cin) if kind == "fc" else (cout, cin, kernel, kernel)
    weight = (rng.standard_normal(shape) / np.sqrt(cin * kernel * kernel)).astype("float32")
    onnx.save(ort_model(kind, weight, size, kernel), path)
    return path


def spec_for(scheme: str, rate: float, lanes: int = 4):
    from npas_tvm.schemes import get_scheme

    spec_type = get_scheme(scheme).spec_type
    fields = {"rate": rate}
    if scheme in ("block_based", "block_punched"):
        fields["block"] = (16, 4)
    return spec_type(**fields)


def measure(layer, scheme: str, rate: float, device: str, work: str,
            stage_input="auto", runner_out: list | None = None) -> dict | None:
    """One row of the table (None if ``scheme`` has no OpenCL kernel); ``stage_input``
    as :func:`relay_passes.gpu.gpu_pipeline`'s; ``runner_out`` receives the runner."""
    import tvm

    from npas_tvm.compiler import import_onnx
    from npas_tvm.model_io import load_onnx
    from npas_tvm.opencl_runner import OpenCLModel
    from npas_tvm.runtime import compare, run_onnxruntime
    from npas_tvm.sparse_compile import write_pruned_onnx
    from npas_tvm.targets import resolve_target
    from relay_passes import AnnotatePruning, ApplyPruning
    from relay_passes.gpu import gpu_pipeline
    from relay_passes.sparse_kernels import sparse_kernel_for
    from relay_passes.weights import attached_params

    name, kind, cin, cout, size, kernel = layer
    if sparse_kernel_for(scheme, "opencl") is None:
        return None
    path = layer_onnx(kind, cin, cout, size, kernel, os.path.join(work, "layer.onnx"))
    model = load_onnx(path)
    mod = tvm.transform.Sequential([AnnotatePruning({"w": spec_for(scheme, rate)}),
                                    ApplyPruning()])(import_onnx(model).mod)
    pruned = write_pruned_onnx(model, attached_params(mod["main"]),
                               os.path.join(work, "pruned.onnx"))
    target, rows = resolve_target(device), []
    runner = OpenCLModel(mod, target.tvm_target, gpu_pipeline(target, rows.append,
                                                               stage_input))
    if not rows or rows[0].kernel is None:
        return None
    if runner_out is not None:
        runner_out.append(runner)
    inputs = pruned.random_inputs()
    check = compare(runner.run(list(inputs.values())), run_onnxruntime(pruned.proto, inputs))
    launches = [k for k in runner.kernels.values() if rows[0].kernel and "sparse" in k.name
                or scheme in k.name]
    launch = max(launches or runner.kernels.values(), key=lambda k: runner.traffic.get(k.name, 0))
    moved = runner.traffic.get(launch.name, 0)
    flops = 2 * rows[0].computed_macs
    return {"layer": name, "scheme": scheme, "rate": rate, "device": device,
            "kernel": launch.name, "work_items": launch.work_items,
            "work_group": launch.local_size[0], "mflop": flops / 1e6, "kb_moved": moved / 1e3,
            "flop_per_byte": flops / max(moved, 1), "max_rel_err": check.max_rel,
            "staged": _staged(runner.source, launch.name), "ok": check.ok}


def _staged(source: str, kernel: str) -> bool:
    """Whether ``kernel`` stages a tile in ``__local`` memory."""
    import re

    match = re.search(rf"__kernel\s+void\s+{kernel}\s*\([^)]*\)\s*\{{", source)
    if match is None:
        return False
    end = source.find("__kernel", match.end())
    return "__local" in source[match.end():end if end >= 0 else len(source)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["mali", "adreno"])
    parser.add_argument("--rates", nargs="+", type=float, default=[3.0, 5.0, 10.0])
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for layer in LAYERS:
            group = "fc" if layer[1] == "fc" else ("conv1x1" if layer[5] == 1 else "conv3x3")
            for scheme in SCHEMES[group]:
                for rate in args.rates:
                    for device in args.devices:
                        row = measure(layer, scheme, rate, device, work)
                        if row is not None:
                            rows.append(row)
                            print(format_row(row), flush=True)
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(row["ok"] for row in rows) else 1


def format_row(row: dict) -> str:
    return (f"| {row['layer']} | {row['scheme']} | {row['rate']:g}x | {row['device']} | "
            f"{row['work_items']} | {row['work_group']} | {row['mflop']:.1f} | "
            f"{row['kb_moved']:.0f} | {row['flop_per_byte']:.1f} | "
            f"{'yes' if row['staged'] else 'no'} | {'OK' if row['ok'] else 'MISMATCH'} |")


HEADER = ("| layer | scheme | rate | device | work-items | work-group | MFLOP | KB moved | "
          "FLOP/byte | __local tile | vs onnxruntime |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|")

if __name__ == "__main__":
    print(HEADER)
    raise SystemExit(main())
