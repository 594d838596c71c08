"""Sparse kernels vs TVM's dense kernels vs onnxruntime, per layer and pruning rate.

    TVM_NUM_THREADS=2 python benchmarks/kernels.py --json kernels.json
    python benchmarks/kernels.py --threads 1 --rates 5 10 --rounds 40 --layers 3x3

For each layer and rate, side by side in one run on this machine:

* ``sparse``: tir_schedules.sparse_conv's kernel on the pruned weight (block_based
  masks for 1x1 convs and FC layers, block_punched for 3x3 convs; block rows = the
  host's fp32 SIMD lanes, 4 input channels per block), blocked ``NCHW{c}c`` tensors;
* ``dense``: the dense path's kernel for the same layer with its default schedule
  (``conv2d_nchwc`` + ``schedule_conv2d_nchwc`` on the same blocked tensors; for FC a TE
  matmul over the pre-transposed weight + ``schedule_reduction``);
* ``ort``: onnxruntime's single-op model (Conv / Gemm on NCHW) with the dense weight.

All engines get the same thread count (TVM's pool, resized in process, and
onnxruntime's intra-op threads); by default every row is timed at ``TVM_NUM_THREADS``
(else all CPUs) and again at 1 thread, the steadier figure on a shared machine. Each
timing is the median of interleaved rounds after warm-up (engines alternate, rotating
the order, with a pause until the process is idle so their spinning thread pools do not
slow each other); a round times back-to-back calls for about ``--round-ms``, so the cache-cold
first call after the pause weighs little. GFLOP/s are dense-equivalent (the unpruned
layer's FLOPs over the time). The sparse kernel's output is checked against numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

# (name, kind, in channels, out channels, input size, kernel)
LAYERS = [
    ("conv1x1 96->576 @14", "conv", 96, 576, 14, 1),
    ("conv1x1 320->1280 @7", "conv", 320, 1280, 7, 1),
    ("fc 1024->1000", "fc", 1024, 1000, 1, 1),
    ("conv3x3 128->128 @28", "conv", 128, 128, 28, 3),
    ("conv3x3 256->256 @14", "conv", 256, 256, 14, 3),
]
RATES = (2, 3, 5, 10)
GOALS = {5: ("dense", 3.0), 10: ("dense", 5.0)}  # rate: (engine, sparse speed-up wanted)
ORT_GOAL = (5, 2.0)  # at 5x, >= 2x faster than onnxruntime's dense layer


@dataclass
class Row:
    layer: str
    rate: float
    threads: int
    kept: float  # share of weights kept
    sparse_ms: float
    dense_ms: float
    ort_ms: float
    rounds: int
    gflop: float  # dense FLOPs of the layer
    max_rel_err: float  # sparse vs numpy

    @property
    def dense_ratio(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def ort_ratio(self) -> float:
        return self.ort_ms / self.sparse_ms


def prune(weight, kind: str, kernel: int, rate: float, lanes: int):
    from npas_tvm.schemes import BlockBasedSpec, BlockPunchedSpec, make_mask

    spec = (BlockPunchedSpec(rate=rate, block=(lanes, 4)) if kernel > 1
            else BlockBasedSpec(rate=rate, block=(lanes, 4)))
    return weight * make_mask(weight, spec)


def ort_model(kind: str, weight, size: int, kernel: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    cin = weight.shape[1]
    if kind == "fc":
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        shape = [1, cin]
    else:
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel, kernel],
                                pads=[kernel // 2] * 4)
        shape = [1, cin, size, size]
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(weight), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class Kernel:
    """A built PrimFunc and its arguments on the CPU; ``run()`` calls it once."""

    def __init__(self, func, target, arrays, out_shape):
        import numpy as np
        import tvm

        from tir_schedules.lowering import cpu_pipeline

        self.lib = tvm.compile(func, target, tir_pipeline=cpu_pipeline())
        self.func = self.lib.mod["main"]  # the PrimFunc itself: 0.2 us a call, not 2
        dev = tvm.cpu()
        self.args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        self.out = tvm.runtime.empty(out_shape, "float32", dev)

    def run(self):
        self.func(*self.args, self.out)

    def result(self):
        self.run()
        return self.out.numpy()


def _schedule(func, cfg):
    from tir_schedules import schedule_primfunc

    scheduled = schedule_primfunc(func, cfg)
    if scheduled is None:
        raise RuntimeError("no schedule applied")
    return scheduled


def sparse_kernel(kind, x, weight, lanes, spec, cfg):
    """The sparse kernel for ``weight`` (already pruned) on input ``x`` (NCHW / NK)."""
    from tvm import te

    from tir_schedules import sparse_conv as sc

    packed = sc.pack_gathered(weight, lanes)
    values = te.placeholder(packed.values.shape, name="values")
    counts = te.placeholder(packed.counts.shape, "int32", name="counts")
    if kind == "fc":  # as the pipeline emits it (partial sums at batch 1)
        chains = sc.dense_chains(x.shape[0], lanes, lanes)
        values_array, taps_array = sc.pad_to_chains(packed.values, packed.gemm_taps(), chains)
        values = te.placeholder(values_array.shape, name="values")
        data = te.placeholder(x.shape, name="data")
        taps = te.placeholder(taps_array.shape, "int32", name="taps")
        out = sc.sparse_dense(data, values, taps, counts, packed.out_channels, chains)
        arrays = [x, values_array, taps_array, packed.counts]
    else:
        xb = blocked(x, lanes)
        kernel = packed.kernel_size[0]
        data = te.placeholder(xb.shape, name="data")
        taps = te.placeholder(packed.taps.shape, "int32", name="taps")
        out = sc.sparse_conv2d_nchwc(data, values, taps, counts, (1, 1), [kernel // 2] * 4,
                                     (1, 1), packed.out_channels,
                                     kernel_size=packed.kernel_size)
        arrays = [xb, packed.values, packed.taps, packed.counts]
    func = te.create_prim_func([data, values, taps, counts, out],
                               index_dtype_override="int64")
    return Kernel(_schedule(func, cfg), spec.tvm_target, arrays,
                  [int(v) for v in out.shape]), packed


def dense_kernel(kind, x, weight, lanes, spec, cfg):
    """The dense path's kernel for the unpruned layer, same blocked tensors."""
    import numpy as np
    from tvm import te

    from tir_schedules import conv2d, generic

    if kind == "fc":
        wt = np.ascontiguousarray(weight.T)  # [K, M]: what FoldConstant leaves of Gemm
        data = te.placeholder(x.shape, name="data")
        w = te.placeholder(wt.shape, name="weight")
        k = te.reduce_axis((0, wt.shape[0]), name="k")
        out = te.compute((x.shape[0], wt.shape[1]),
                         lambda i, j: te.sum(data[i, k] * w[k, j], axis=k), name="matmul")
        func = te.create_prim_func([data, w, out], index_dtype_override="int64")
        sch = _tvm_schedule(func)
        generic.schedule_reduction(sch, cfg)
        return Kernel(sch.mod["main"], spec.tvm_target, [x, wt], [int(v) for v in out.shape])
    xb = blocked(x, lanes)
    f, c, kh, kw = weight.shape
    wb = np.ascontiguousarray(weight.reshape(f // lanes, lanes, c // lanes, lanes, kh, kw)
                              .transpose(0, 2, 4, 5, 3, 1))
    data = te.placeholder(xb.shape, name="data")
    w = te.placeholder(wb.shape, name="weight")
    out = conv2d.conv2d_nchwc(data, w, (1, 1), [kh // 2] * 4, (1, 1))
    func = te.create_prim_func([data, w, out], index_dtype_override="int64")
    sch = _tvm_schedule(func)
    conv2d.schedule_conv2d_nchwc(sch, cfg)
    return Kernel(sch.mod["main"], spec.tvm_target, [xb, wb], [int(v) for v in out.shape])


def _tvm_schedule(func):
    import tvm

    return tvm.s_tir.Schedule(func)


def blocked(x, block: int):
    import numpy as np

    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))


def unblocked(y):
    n, chunks, h, w, b = y.shape
    return y.transpose(0, 1, 4, 2, 3).reshape(n, chunks * b, h, w)


def reference(kind, x, weight):
    import numpy as np

    from tir_schedules.sparse_conv import reference_conv2d

    if kind == "fc":
        return x.astype(np.float64) @ weight.T
    k = weight.shape[2]
    return reference_conv2d(x, weight, (1, 1), [k // 2] * 4, (1, 1), 1)


def set_tvm_threads(threads: int) -> None:
    """Resize TVM's CPU thread pool in this process (``TVM_NUM_THREADS`` only sets the
    size it starts with)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)


def bench_layer(layer, rate, lanes, spec, cfg, thread_counts, rounds, round_ms):
    """Rows (one per thread count) timing the three engines on one layer and rate."""
    import numpy as np

    from npas_tvm.runtime import ort_session, time_interleaved

    name, kind, cin, cout, size, kernel = layer
    rng = np.random.default_rng(0)
    shape = (cout, cin) if kind == "fc" else (cout, cin, kernel, kernel)
    weight = rng.standard_normal(shape).astype("float32")
    pruned = prune(weight, kind, kernel, rate, lanes).astype("float32")
    x = rng.standard_normal((1, cin) if kind == "fc" else (1, cin, size, size)).astype("float32")
    sparse, _ = sparse_kernel(kind, x, pruned, lanes, spec, cfg)
    dense = dense_kernel(kind, x, weight, lanes, spec, cfg)
    got = sparse.result()
    got = got if kind == "fc" else unblocked(got)
    ref = reference(kind, x, pruned)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > 1e-4:
        print(f"  {name} @{rate}x: sparse kernel MISMATCH (max rel err {err:.3g})",
              file=sys.stderr)
    flops = 2 * cout * cin * kernel * kernel * (1 if kind == "fc" else size * size)

    rows = []
    for threads in thread_counts:
        set_tvm_threads(threads)
        session = ort_session(ort_model(kind, weight, size, kernel), threads)
        feed = {"x": x}
        engines = {"sparse": sparse.run, "dense": dense.run,
                   "ort": lambda: session.run(None, feed)}
        calls = {name: calls_per_round(fn, round_ms) for name, fn in engines.items()}
        timings = time_interleaved({name: repeat(fn, calls[name])
                                    for name, fn in engines.items()},
                                   rounds=rounds, budget_s=30.0, warm_call=False)
        ms = {name: timings[name].median_ms / calls[name] for name in engines}
        rows.append(Row(name, rate, threads, float((pruned != 0).mean()), ms["sparse"],
                        ms["dense"], ms["ort"], timings["sparse"].rounds, flops / 1e9, err))
        del session
    return rows


ROUND_MS = 20.0  # default length of one engine's timed round
MIN_CALLS = 10  # back-to-back calls in a round, at the least


def calls_per_round(fn, round_ms: float) -> int:
    """Back-to-back calls that make one timed round last about ``round_ms`` (at least
    ``MIN_CALLS``), so the first call of a round weighs little in its mean: after the
    pause it finds cold caches and an untrained branch predictor (+0.2 ms on a 0.7 ms
    pattern kernel, +0.13 ms on a 1.4 ms dense one), which rounds of 5 calls (3 ms)
    weighed at a fifth."""
    import time

    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    once_ms = (time.perf_counter() - start) * 1e3
    return max(MIN_CALLS, min(500, round(round_ms / max(once_ms, 1e-6))))


def repeat(fn, calls: int):
    return lambda: [fn() for _ in range(calls)]


def print_row(row: Row) -> None:
    rate = lambda ms: row.gflop / ms * 1e3  # noqa: E731
    print(f"| {row.layer} | {row.rate:g}x | {row.threads} | {100 * row.kept:.1f}% | "
          f"{row.sparse_ms:.4f} | "
          f"{row.dense_ms:.4f} | {row.ort_ms:.4f} | {row.dense_ratio:.2f}x | "
          f"{row.ort_ratio:.2f}x | {rate(row.sparse_ms):.0f} | {rate(row.dense_ms):.0f} | "
          f"{rate(row.ort_ms):.0f} |", flush=True)


def print_goals(rows: list[Row]) -> None:
    print("\ngoals: at 5x >= 3x faster than dense TVM and >= 2x faster than ORT; at 10x "
          ">= 5x faster than dense TVM")
    for row in rows:
        checks = []
        if row.rate in GOALS:
            _, want = GOALS[row.rate]
            checks.append(f"vs dense {row.dense_ratio:.2f}x (want {want:g}x): "
                          f"{'met' if row.dense_ratio >= want else 'MISSED'}")
        if row.rate == ORT_GOAL[0]:
            checks.append(f"vs ORT {row.ort_ratio:.2f}x (want {ORT_GOAL[1]:g}x): "
                          f"{'met' if row.ort_ratio >= ORT_GOAL[1] else 'MISSED'}")
        if checks:
            print(f"  {row.layer} @{row.rate:g}x, {row.threads} thread(s): " + "; ".join(checks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts, each for "
                        "every engine (default: TVM_NUM_THREADS, else all CPUs, then 1)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds")
    parser.add_argument("--round-ms", type=float, default=ROUND_MS, help="length of one "
                        f"engine's timed round (back-to-back calls; {MIN_CALLS} at the least)")
    parser.add_argument("--rates", type=float, nargs="*", default=list(RATES))
    parser.add_argument("--layers", nargs="*", help="substrings of the layer names to run")
    parser.add_argument("--knobs", default="{}", help="JSON of CpuScheduleConfig knobs "
                        "to override (e.g. '{\"sparse_parallel\": \"blocks\"}')")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads[0])
    from npas_tvm.runtime import ensure_thread_env

    first = ensure_thread_env()
    thread_counts = args.threads or sorted({first, 1}, reverse=True)
    from npas_tvm.targets import detect_host_cpu, resolve_target
    from tir_schedules import default_config

    spec = resolve_target("host")
    cfg = default_config(spec).with_knobs(**json.loads(args.knobs))
    lanes = spec.simd_lanes
    layers = [layer for layer in LAYERS
              if not args.layers or any(part in layer[0] for part in args.layers)]
    print(f"machine: {detect_host_cpu().describe()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.machine()}")
    print(f"settings: threads {thread_counts} (TVM's pool and onnxruntime's intra-op "
          f"threads alike; TVM_NUM_THREADS={first}); medians of up to {args.rounds} "
          f"interleaved rounds of ~{args.round_ms:g} ms of calls each, after warm-up; block rows "
          f"{lanes}, 4 columns/channels per block")
    print(f"schedule config: {cfg}")
    print("\n| layer | rate | threads | kept | sparse (ms) | dense TVM (ms) | ORT (ms) | "
          "dense / sparse | ORT / sparse | sparse GFLOP/s | dense GFLOP/s | ORT GFLOP/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for layer in layers:
        for rate in args.rates:
            for row in bench_layer(layer, rate, lanes, spec, cfg, thread_counts, args.rounds,
                                   args.round_ms):
                rows.append(row)
                print_row(row)
    print_goals(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": detect_host_cpu().describe(), "threads": thread_counts,
                       "rounds": args.rounds, "round_ms": args.round_ms, "config": repr(cfg),
                       "rows": [asdict(r) | {"dense_ratio": r.dense_ratio,
                                             "ort_ratio": r.ort_ratio} for r in rows]},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
