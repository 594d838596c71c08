"""``npas-tvm demo``: the main job on a built-in model, end to end.

Exports a zoo model to ONNX, compiles it for the host, checks it against onnxruntime
and prints a latency table (TVM vs onnxruntime, medians, ratio) with the machine and
thread settings it was measured under.
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
        print(f"{name}: compiled -> {library}; vs onnxruntime: {check} "
              f"({'OK' if check.ok else 'MISMATCH'})", flush=True)
        tensors = runner.tensors(inputs)
        timings = time_interleaved(
            {"tvm": lambda: runner.vm["main"](*tensors),
             "ort": lambda: session.run(None, inputs)}, rounds=args.rounds)
        rows.append((name, timings["tvm"], timings["ort"]))
    print()
    print("| model | TVM dense (ms) | onnxruntime (ms) | TVM / onnxruntime | rounds |")
    print("|---|---:|---:|---:|---:|")
    for name, tvm_t, ort_t in rows:
        print(f"| {name} | {tvm_t.median_ms:.2f} | {ort_t.median_ms:.2f} | "
              f"{tvm_t.median_ms / ort_t.median_ms:.2f}x | {tvm_t.rounds} |")
    return 1 if failed else 0
