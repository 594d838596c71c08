"""``npas-tvm compile MODEL.onnx --target T -o OUT.so``."""

from __future__ import annotations

import time


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("compile", parents=[common],
                                   help="compile an ONNX model to a TVM library")
    parser.add_argument("model", help="the ONNX file")
    parser.add_argument("--target", default="host",
                        help="host, arm-cpu, mali, adreno, or a TVM target as JSON "
                             "(see `npas-tvm targets`)")
    parser.add_argument("-o", "--output", required=True, help="the library to write (.so/.tar)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="fix an input's shape (repeatable); a dynamic batch defaults to 1")
    parser.add_argument("--cc", help="linker for the artifact (default: the target's, e.g. "
                                     "aarch64-linux-gnu-gcc for arm-cpu)")
    parser.add_argument("--check", action="store_true",
                        help="run the result and onnxruntime on one random input and compare "
                             "(host only; with --npas, against the pruned ONNX); exits 1 "
                             "above 1e-4 relative error")
    parser.add_argument("--npas", nargs="?", const="auto", metavar="PLAN.json|rule|detect",
                        help="prune and compile sparse: a plan file, 'rule' (the rule-based "
                             "plan for the target), or 'detect' (the schemes the weights' "
                             "zeros already follow). Without a value: 'detect' if the model "
                             "is already pruned, else 'rule'. Writes OUT.pruned.onnx beside "
                             "the library")
    parser.add_argument("--rate", type=float, default=None,
                        help="with --npas rule: the target rate (default 3)")
    parser.add_argument("--tuning-db", metavar="DIR",
                        help="apply the best schedules of `npas-tvm tune`'s database in DIR "
                             "(kernels it has no record for keep the default schedules)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.compiler import compile_model, export
    from npas_tvm.errors import NpasError
    from npas_tvm.model_io import load_onnx, parse_input_shapes
    from npas_tvm.targets import resolve_target

    spec = resolve_target(args.target)
    if args.check and not spec.runs_on_host:
        raise NpasError(f"--check runs the model here, so it needs --target host "
                        f"(not {args.target}); use `npas-tvm bench` over RPC for a device")
    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    if args.rate is not None and args.npas not in ("rule", "auto"):
        raise NpasError(f"--rate applies to --npas rule; {args.npas or 'a dense compile'} "
                        "sets its own rates")
    tuning_db = None
    if args.tuning_db:
        from npas_tvm.tuning import TuningDatabase

        if spec.tvm_target.kind.name != "llvm":
            raise NpasError(f"--tuning-db applies to CPU targets (host, arm-cpu), not "
                            f"{spec.name}")
        tuning_db = TuningDatabase(args.tuning_db, spec)
    start = time.perf_counter()
    if args.npas is None:
        executable = compile_model(model, spec, tuning_db=tuning_db)
    else:
        from npas_tvm.sparse_compile import compile_sparse

        executable, model = compile_sparse(model, spec, args.npas, args.rate, args.output,
                                           tuning_db=tuning_db)
    if tuning_db is not None:
        print(tuning_db.summary())
    export(executable, args.output, spec, args.cc)
    print(f"compiled {args.model} for {spec.name} in {time.perf_counter() - start:.1f} s "
          f"-> {args.output}")
    if args.check:
        return check_against_onnxruntime(model, args.output)
    return 0


def check_against_onnxruntime(model, library) -> int:
    """Run ``library`` and onnxruntime on one random input; 1 if they disagree."""
    from npas_tvm.runtime import TVMRunner, compare, run_onnxruntime

    inputs = model.random_inputs()
    result = compare(TVMRunner(library, list(model.input_shapes)).run(inputs),
                     run_onnxruntime(model.proto, inputs))
    print(result.report())
    return 0 if result.ok else 1
