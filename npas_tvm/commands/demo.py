"""``npas-tvm demo``: the main job on a built-in model, end to end.

Exports a zoo model to ONNX and compiles it for the host twice: dense, and pruned with
the rule-based plan (``--npas``, sparse kernels). Checks each against onnxruntime (the
sparse one on the pruned ONNX) and prints a latency table (sparse TVM, dense TVM,
onnxruntime on the dense model; medians, ratios) with the machine and thread settings
it was measured under.
"""

from __future__ import annotations

import os
import platform


def register(subparsers, common) -> None:
    from npas_tvm.zoo import DEFAULT_MODEL, ZOO_NAMES

    parser = subparsers.add_parser("demo", parents=[common],
                                   help="export, compile, check and time a built-in model")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=(*ZOO_NAMES, "all"),
                        help=f"zoo model (default {DEFAULT_MODEL}) or all")
    parser.add_argument("--work-dir", default="npas-demo", help="where models and libraries go")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per engine")
    parser.add_argument("--npas", default="rule", metavar="PLAN.json|rule",
                        help="the pruning of the sparse build (default: the rule-based plan)")
    parser.add_argument("--rate", type=float, default=None,
                        help="with --npas rule: the target rate (default 3)")
    parser.add_argument("--dense-only", action="store_true",
                        help="skip the sparse build (dense TVM vs onnxruntime only)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.compiler import compile_model, export
    from npas_tvm.model_io import load_onnx
    from npas_tvm.runtime import (TVMRunner, compare, default_threads, ort_session,
                                  time_interleaved)
    from npas_tvm.targets import detect_host_cpu, resolve_target
    from npas_tvm.zoo import ZOO_NAMES, export_zoo_model

    names = ZOO_NAMES if args.model == "all" else (args.model,)
    spec = resolve_target("host")
    threads = default_threads()
    print(f"machine: {detect_host_cpu().describe()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.machine()}")
    print(f"settings: TVM_NUM_THREADS={threads}, onnxruntime intra-op threads={threads}, "
          f"medians of up to {args.rounds} interleaved rounds after 3 warm-up runs")
    rows, failed = [], False
    for name in names:
        onnx_path = export_zoo_model(name, os.path.join(args.work_dir, f"{name}.onnx"))
        model = load_onnx(onnx_path)
        library = export(compile_model(model, spec),
                         os.path.join(args.work_dir, f"{name}.host.so"), spec)
        runner = TVMRunner(library, list(model.input_shapes))
        session = ort_session(onnx_path)
        inputs = model.random_inputs()
        check = compare(runner.run(inputs), session.run(None, inputs))
        failed |= not check.ok
        print(f"{name}: dense -> {library}; vs onnxruntime: {check} "
              f"({'OK' if check.ok else 'MISMATCH'})", flush=True)
        engines = {"dense": _call(runner, inputs), "ort": lambda: session.run(None, inputs)}
        if not args.dense_only:
            sparse, ok = _sparse_build(model, spec, args, name)
            failed |= not ok
            engines["sparse"] = _call(sparse, inputs)
        timings = time_interleaved(engines, rounds=args.rounds)
        rows.append((name, timings))
    print()
    print_table(rows)
    return 1 if failed else 0


def _call(runner, inputs):
    tensors = runner.tensors(inputs)
    return lambda: runner.vm["main"](*tensors)


def _sparse_build(model, spec, args, name: str):
    """Compile ``model`` with ``--npas``; (runner, whether it matches the pruned ONNX)."""
    from npas_tvm.compiler import export
    from npas_tvm.runtime import TVMRunner, compare, run_onnxruntime
    from npas_tvm.sparse_compile import compile_sparse

    output = os.path.join(args.work_dir, f"{name}.npas.host.so")
    executable, pruned = compile_sparse(model, spec, args.npas, args.rate, output,
                                        table=False)
    library = export(executable, output, spec)
    runner = TVMRunner(library, list(pruned.input_shapes))
    inputs = pruned.random_inputs()
    check = compare(runner.run(inputs), run_onnxruntime(pruned.proto, inputs))
    print(f"{name}: sparse -> {library}; vs onnxruntime on {pruned.path}: {check} "
          f"({'OK' if check.ok else 'MISMATCH'})", flush=True)
    return runner, check.ok


def print_table(rows) -> None:
    sparse = any("sparse" in timings for _, timings in rows)
    head = "| model | TVM sparse (ms) | TVM dense (ms) | onnxruntime (ms) | sparse: vs ORT | sparse: vs dense TVM | dense TVM / ORT | rounds |"
    if not sparse:
        head = "| model | TVM dense (ms) | onnxruntime (ms) | dense TVM / ORT | rounds |"
    print(head)
    print("|---" + "|---:" * (head.count("|") - 2) + "|")
    for name, t in rows:
        dense, ort = t["dense"].median_ms, t["ort"].median_ms
        cells = [f"{dense:.2f}", f"{ort:.2f}"]
        if sparse:
            fast = t["sparse"].median_ms
            cells = [f"{fast:.2f}", *cells, speed(ort / fast), speed(dense / fast)]
        cells += [f"{dense / ort:.2f}x", str(t["dense"].rounds)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def speed(ratio: float) -> str:
    """A time ratio (other / ours) as words: ``1.23x faster`` or ``1.11x slower``."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
