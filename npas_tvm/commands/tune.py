"""``npas-tvm tune MODEL.onnx --work-dir DIR``: tune the CPU kernels' knobs.

Measures, here or on an RPC device, the schedules our templates give for each kernel's
knob points (see :mod:`npas_tvm.tuning`) and keeps every result in DIR, a
meta_schedule JSON database that ``npas-tvm compile --tuning-db DIR`` applies. An
interrupted run (Ctrl-C, a device that went away) keeps what it measured; running
the same command again continues from there.
"""

from __future__ import annotations

import time


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("tune", parents=[common],
                                   help="tune the kernels' schedules (meta_schedule, XGBoost "
                                        "cost model) here or on an RPC device")
    parser.add_argument("model", help="the ONNX file")
    parser.add_argument("--target", default="host", help="host, arm-cpu, or an llvm target "
                                                         "as JSON")
    parser.add_argument("--work-dir", required=True, metavar="DIR",
                        help="the tuning database (created, or continued when it exists)")
    parser.add_argument("--trials", type=int, default=64,
                        help="measurements over all kernels, shared by FLOPs (those already "
                             "in DIR count)")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device of "
                                                                   "this tracker")
    parser.add_argument("--rpc-key", help="the device key at the tracker")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="fix an input's shape (repeatable)")
    parser.add_argument("--npas", nargs="?", const="auto", metavar="PLAN.json|rule|detect",
                        help="prune first, as `compile --npas` does, and tune the sparse "
                             "kernels too (compile with the same --npas)")
    parser.add_argument("--rate", type=float, default=None,
                        help="with --npas rule: the target rate (default 3)")
    parser.add_argument("--batch", type=int, default=4,
                        help="candidates measured between cost-model updates")
    parser.add_argument("--device-retries", type=int, default=3,
                        help="retries of a batch when the device is unreachable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.errors import NpasError
    from npas_tvm.model_io import load_onnx, parse_input_shapes
    from npas_tvm.targets import resolve_target
    from npas_tvm.tuning import extract_tasks, prepare_module, tune

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise NpasError("--rpc-tracker and --rpc-key go together")
    if args.trials < 0 or args.batch < 1:
        raise NpasError("--trials must be >= 0 and --batch >= 1")
    spec = resolve_target(args.target)
    if spec.tvm_target.kind.name != "llvm":
        raise NpasError(f"tune covers CPU targets (host, arm-cpu), not {spec.name}")
    if args.rpc_tracker:
        from npas_tvm.device import request_session

        request_session(args.rpc_tracker, args.rpc_key, session_timeout_s=30)  # fail fast
    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    start = time.perf_counter()
    tasks = extract_tasks(prepare_module(model, spec, args.npas, args.rate), spec)
    print(f"{args.model}: {len(tasks)} kernels to tune for {spec.name} "
          f"({sum(t.calls for t in tasks)} calls)")
    try:
        report = tune(tasks, spec, args.work_dir, args.trials, args.rpc_tracker, args.rpc_key,
                      batch=args.batch, device_retries=args.device_retries,
                      progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: what was measured is kept in {args.work_dir}; run the same "
              "command again to continue")
        return 130
    for name, default, best in report.best:
        print(f"  {name}: default {default * 1e3:.4f} ms, best {best * 1e3:.4f} ms "
              f"({default / best:.2f}x)")
    print(f"measured {report.measured} new candidates ({report.reused} already in the "
          f"database) in {time.perf_counter() - start:.0f} s -> {args.work_dir}")
    if report.stopped:
        print(f"tuning stopped early: {report.stopped}; the {report.measured} new results "
              f"are saved; run the same command again to continue")
    return 0
