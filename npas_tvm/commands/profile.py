"""``npas-tvm profile MODEL``: which ops take the time in a compiled model.

MODEL is an ONNX file or a zoo name. The model is compiled for the host and run with
the Relax VM's instrument hook (:mod:`npas_tvm.profile`); the table lists the slowest
kernels and the time per op kind, the starting point of any schedule work.
"""

from __future__ import annotations

import json
import os


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("profile", parents=[common],
                                   help="per-op latency breakdown of a model on the host")
    parser.add_argument("model", help="an ONNX file or a zoo model name")
    parser.add_argument("--repeat", type=int, default=10, help="profiled runs (median)")
    parser.add_argument("--top", type=int, default=15, help="ops listed before the summary")
    parser.add_argument("--work-dir", default="npas-profile", help="where zoo models are exported")
    parser.add_argument("--json", metavar="PATH", help="also write the breakdown as JSON")
    parser.add_argument("--tvm-default", action="store_true",
                        help="build with TVM's default CPU pipeline instead of npas-tvm's "
                             "dense schedules (the baseline)")
    parser.add_argument("--npas", nargs="?", const="auto", metavar="PLAN.json|rule|detect",
                        help="prune and compile sparse first, as `compile --npas` does (the "
                             "pruned ONNX goes to --work-dir)")
    parser.add_argument("--rate", type=float, default=None,
                        help="with --npas rule: the target rate (default 3)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.compiler import bind_params, build, import_onnx
    from npas_tvm.errors import NpasError
    from npas_tvm.model_io import load_onnx
    from npas_tvm.profile import profile_vm
    from npas_tvm.runtime import TVMRunner, default_threads
    from npas_tvm.targets import detect_host_cpu, resolve_target
    from npas_tvm.zoo import ZOO_NAMES, export_zoo_model

    path = args.model
    if args.model in ZOO_NAMES and not os.path.exists(args.model):
        path = export_zoo_model(args.model, os.path.join(args.work_dir, f"{args.model}.onnx"))
    model = load_onnx(path)
    spec = resolve_target("host")
    if args.npas:
        from npas_tvm.sparse_compile import compile_sparse

        if args.tvm_default:
            raise NpasError("--npas builds with npas-tvm's schedules; drop --tvm-default")
        stem = os.path.splitext(os.path.basename(path))[0]
        executable, model = compile_sparse(model, spec, args.npas, args.rate,
                                           os.path.join(args.work_dir, f"{stem}.so"))
    else:
        executable = build(bind_params(import_onnx(model)), spec,
                           dense_schedules=not args.tvm_default)
    runner = TVMRunner(executable, list(model.input_shapes))
    report = profile_vm(runner.vm, runner.tensors(model.random_inputs()), repeat=args.repeat)
    pipeline = ("TVM default" if args.tvm_default else
                f"npas-tvm, --npas {args.npas}" if args.npas else "npas-tvm dense schedules")
    print(f"{args.model} on {detect_host_cpu().describe()}, TVM_NUM_THREADS="
          f"{default_threads()}, {pipeline}")
    print(report.table(top=args.top))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": args.model, "pipeline": pipeline, **report.as_dict()}, fh,
                      indent=1)
    return 0
