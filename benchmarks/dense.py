"""Dense CPU path vs onnxruntime: per layer and end to end, side by side in one run.

    TVM_NUM_THREADS=2 python benchmarks/dense.py --json dense.json
    python benchmarks/dense.py --threads 1 --models mobilenet_v2 --rounds 30

Both engines get the same thread count. Each timing is the median of interleaved
rounds after warm-up (the engines alternate, with a pause until the process is idle so
their spinning thread pools do not slow each other). Layer rows give GFLOP/s and the share
of the machine's fp32 peak, measured here by a register-only FMA kernel (no memory
traffic) built for the same target and run on the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# (name, in channels, out channels, input size, kernel, stride, groups)
LAYERS = [
    ("conv3x3 128->128 @28", 128, 128, 28, 3, 1, 1),
    ("conv3x3 64->64 @56", 64, 64, 56, 3, 1, 1),
    ("conv3x3 512->512 @7", 512, 512, 7, 3, 1, 1),
    ("conv7x7/2 3->64 @224", 3, 64, 224, 7, 2, 1),
    ("conv1x1 96->576 @14", 96, 576, 14, 1, 1, 1),
    ("conv1x1 320->1280 @7", 320, 1280, 7, 1, 1, 1),
    ("dw3x3 144 @56", 144, 144, 56, 3, 1, 144),
    ("dw3x3/2 96 @112", 96, 96, 112, 3, 2, 96),
]
DEFAULT_MODELS = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "vgg_cifar")


@dataclass
class Row:
    name: str
    tvm_ms: float
    ort_ms: float
    rounds: int
    gflop: float = 0.0  # 0 for whole models

    @property
    def ratio(self) -> float:
        return self.tvm_ms / self.ort_ms


def conv_onnx(cin, cout, size, kernel, stride, groups):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal(
        (cout, cin // groups, kernel, kernel)).astype("float32")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=[kernel // 2] * 4, group=groups)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def conv_gflop(cin, cout, size, kernel, stride, groups) -> float:
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return 2 * cout * out * out * (cin // groups) * kernel * kernel / 1e9


def measure_peak_gflops(spec, threads: int) -> float:
    """fp32 GFLOP/s of a register-only FMA loop (12 independent vector chains).

    It runs on one thread (a serial kernel keeps its accumulators in registers) and is
    scaled by ``threads``: the peak of that many cores at the clock one core reaches.
    """
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    lanes, chains, steps = spec.simd_lanes, 12, 200_000

    @T.prim_func(s_tir=True)
    def fma_loop(x: T.Buffer((lanes,), "float32"), out: T.Buffer((chains, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})  # else every FMA stores its accumulator
        acc = T.alloc_buffer((chains, lanes), "float32", scope="local")
        for i in T.unroll(chains):
            for lane in T.vectorized(lanes):
                acc[i, lane] = x[lane]
        for _ in range(steps):
            for i in T.unroll(chains):
                for lane in T.vectorized(lanes):
                    acc[i, lane] = acc[i, lane] * x[lane] + x[lane]
        for i in T.unroll(chains):
            for lane in T.vectorized(lanes):
                out[i, lane] = acc[i, lane]

    lib = tvm.compile(fma_loop, spec.tvm_target)
    dev = tvm.cpu()
    x = tvm.runtime.tensor(np.full(lanes, 0.5, "float32"), dev)
    out = tvm.runtime.empty((chains, lanes), "float32", dev)
    seconds = lib.mod.time_evaluator("fma_loop", dev, number=3, repeat=5)(x, out).min
    return threads * 2 * chains * lanes * steps / seconds / 1e9


def compare_engines(onnx_path_or_proto, build_fn, rounds: int):
    """Build both engines for one model and time them interleaved; returns (tvm, ort)."""
    from npas_tvm.compiler import bind_params, build, import_onnx
    from npas_tvm.runtime import TVMRunner, compare, ort_session, time_interleaved

    model = build_fn(onnx_path_or_proto)
    runner = TVMRunner(build(bind_params(import_onnx(model)), build_fn.spec),
                       list(model.input_shapes))
    session = ort_session(model.proto)
    inputs = model.random_inputs()
    check = compare(runner.run(inputs), session.run(None, inputs))
    if not check.ok:
        print(f"  numerics MISMATCH: {check}", file=sys.stderr)
    tensors = runner.tensors(inputs)
    timings = time_interleaved({"tvm": lambda: runner.vm["main"](*tensors),
                                "ort": lambda: session.run(None, inputs)},
                               rounds=rounds, budget_s=90.0)
    return timings["tvm"], timings["ort"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="threads for both engines "
                        "(default TVM_NUM_THREADS, else all CPUs)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS),
                        help="zoo models timed end to end (none: layers only)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from npas_tvm.runtime import ensure_thread_env

    threads = ensure_thread_env()
    import onnx

    from npas_tvm.model_io import load_onnx
    from npas_tvm.targets import detect_host_cpu, resolve_target
    from npas_tvm.zoo import export_zoo_model

    spec = resolve_target("host")
    work = tempfile.mkdtemp(prefix="npas-bench-")

    def load(source):
        if not isinstance(source, str):
            path = os.path.join(work, f"layer{time.monotonic_ns()}.onnx")
            onnx.save(source, path)
            source = path
        return load_onnx(source)

    load.spec = spec
    peak = measure_peak_gflops(spec, threads)
    print(f"machine: {detect_host_cpu().describe()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.machine()}")
    print(f"settings: TVM_NUM_THREADS={threads}, onnxruntime intra-op threads={threads}; "
          f"medians of up to {args.rounds} interleaved rounds after 3 warm-up runs")
    print(f"fp32 peak: {peak:.0f} GFLOP/s ({threads} x one core's register-only FMA loop)")
    layer_rows: list[Row] = []
    if not args.no_layers:
        print("\n| layer | TVM (ms) | ORT (ms) | TVM / ORT | TVM GFLOP/s | % peak | "
              "ORT GFLOP/s | % peak |\n|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for name, *shape in LAYERS:
            tvm_t, ort_t = compare_engines(conv_onnx(*shape), load, args.rounds)
            row = Row(name, tvm_t.median_ms, ort_t.median_ms, tvm_t.rounds, conv_gflop(*shape))
            layer_rows.append(row)
            tvm_rate, ort_rate = row.gflop / row.tvm_ms * 1e3, row.gflop / row.ort_ms * 1e3
            print(f"| {name} | {row.tvm_ms:.3f} | {row.ort_ms:.3f} | {row.ratio:.2f}x | "
                  f"{tvm_rate:.0f} | {100 * tvm_rate / peak:.0f}% | {ort_rate:.0f} | "
                  f"{100 * ort_rate / peak:.0f}% |", flush=True)
    model_rows: list[Row] = []
    if args.models:
        print("\n| model | TVM (ms) | ORT (ms) | TVM / ORT | rounds |\n|---|---:|---:|---:|---:|",
              flush=True)
        for name in args.models:
            path = export_zoo_model(name, os.path.join(work, f"{name}.onnx"))
            tvm_t, ort_t = compare_engines(path, load, args.rounds)
            row = Row(name, tvm_t.median_ms, ort_t.median_ms, tvm_t.rounds)
            model_rows.append(row)
            print(f"| {name} | {row.tvm_ms:.2f} | {row.ort_ms:.2f} | {row.ratio:.2f}x | "
                  f"{row.rounds} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": detect_host_cpu().describe(), "threads": threads,
                       "peak_gflops": peak,
                       "layers": [asdict(r) | {"ratio": r.ratio} for r in layer_rows],
                       "models": [asdict(r) | {"ratio": r.ratio} for r in model_rows]},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
