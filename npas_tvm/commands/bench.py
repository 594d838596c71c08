"""``npas-tvm bench OUT.so``: run, check and time a compiled library, here or over RPC."""

from __future__ import annotations

import argparse
import os


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("bench", parents=[common],
                                   help="run, check and time a library locally or on an RPC "
                                        "device")
    parser.add_argument("library", nargs="?", help="the .so written by `npas-tvm compile`")
    parser.add_argument("--model", help="the ONNX model it was compiled from (input shapes; "
                                        "the output is checked against onnxruntime)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="input shapes, when no --model is given or to fix its dims")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="run on a device of this "
                                                                   "tracker")
    parser.add_argument("--rpc-key", help="the device key at the tracker")
    parser.add_argument("--device", choices=("cpu", "opencl"), default="cpu",
                        help="where the library runs on the device (opencl: Mali/Adreno)")
    parser.add_argument("--number", type=int, default=10, help="runs per timed repeat")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats (median taken)")
    parser.add_argument("--suite", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="run the end-to-end benchmark suite instead (benchmarks/run.py; "
                             "the rest of the line are its options, e.g. --quick)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.errors import NpasError
    from npas_tvm.model_io import load_onnx, parse_input_shapes
    from npas_tvm.runtime import (TVMRunner, compare, default_threads,
                                  run_onnxruntime)

    if args.suite is not None:
        return run_suite(args.suite)
    if not args.library:
        raise NpasError("bench: give the library to run (or --suite for the benchmark suite)")
    if not os.path.isfile(args.library):
        raise NpasError(f"{args.library}: no such file")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise NpasError("--rpc-tracker and --rpc-key go together")
    shapes = parse_input_shapes(args.input_shape)
    model = load_onnx(args.model, shapes) if args.model else None
    if model is None and not shapes:
        raise NpasError("give --model MODEL.onnx or --input-shape NAME=D1,... for the inputs")
    if model is not None:
        input_names, inputs = list(model.input_shapes), model.random_inputs()
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        input_names = list(shapes)
        inputs = {n: rng.standard_normal(s).astype("float32") for n, s in shapes.items()}

    if args.rpc_tracker:
        from npas_tvm.device import request_session

        session = request_session(args.rpc_tracker, args.rpc_key)
        session.upload(args.library)
        library = session.load_module(os.path.basename(args.library))
        device = session.cl() if args.device == "opencl" else session.cpu()
        where = f"device {args.rpc_key!r} via {args.rpc_tracker}"
    else:
        import tvm

        library, device = args.library, (tvm.cpu() if args.device == "cpu" else tvm.opencl())
        where = f"this machine ({default_threads()} threads)"
    runner = TVMRunner(library, input_names, device)
    status = 0
    if model is not None:
        result = compare(runner.run(inputs), run_onnxruntime(model.proto, inputs))
        print(result.report())
        status = 0 if result.ok else 1
    timing = runner.time(inputs, args.number, args.repeat)
    print(f"{args.library} on {where}: median {timing.median_ms:.3f} ms "
          f"(min {timing.min_ms:.3f}, max {timing.max_ms:.3f}; {args.repeat} repeats x "
          f"{args.number} runs)")
    return status


def run_suite(suite_args: list[str]) -> int:
    """``benchmarks/run.py`` of the source tree (it is not installed with the package)."""
    import importlib.util

    from npas_tvm.errors import NpasError

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benchmarks", "run.py")
    if not os.path.isfile(path):
        raise NpasError("bench --suite: benchmarks/run.py ships with the source tree; run it "
                        "from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("npas_benchmark_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(suite_args)

