"""``npas-tvm search MODEL --target T --latency-ms X --data digits --budget N --out DIR``.

Chooses each layer's pruning scheme and rate for accuracy under a latency budget (see
:mod:`search.session`); the result compiles with ``npas-tvm compile --npas DIR/plan.json``.
Interrupt it at any time: the same command continues from ``DIR/search_log.jsonl``.
"""

from __future__ import annotations

import shutil


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "search", parents=[common],
        help="search per-layer pruning schemes and rates under a latency budget "
             "(Q-learning + Bayesian optimization)")
    parser.add_argument("model", help="a zoo model name (see `npas-tvm zoo list`) or an "
                                      "ONNX file")
    parser.add_argument("--target", default="host", help="host, arm-cpu (with --rpc-*), ...")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="the latency budget (default: half the dense model's "
                             "predicted latency, or 1.25x the fastest plan's if more)")
    parser.add_argument("--data", default="digits",
                        help="digits (scikit-learn's bundled set), an ImageFolder-style "
                             "directory, or an .npz with x/y arrays")
    parser.add_argument("--budget", type=int, default=30,
                        help="accuracy evaluations (prune + fine-tune) per strategy")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="outputs and the resumable log (continued when present)")
    parser.add_argument("--restart", action="store_true",
                        help="discard DIR's log and start over")
    parser.add_argument("--baselines", default="",
                        help="also run these at the same budget, comma-separated: "
                             "rule,random")
    parser.add_argument("--method", choices=("magnitude", "admm"), default="magnitude",
                        help="pruning algorithm before the masked fine-tune")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs per evaluation, early stopping (default: "
                             "measured settings per zoo model)")
    parser.add_argument("--dense-epochs", type=int, default=15,
                        help="epochs of the dense starting point (trained once, kept)")
    parser.add_argument("--final-epochs", type=int, default=10,
                        help="whole epochs of the chosen plan's final fine-tune (0: none)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training input size (default: the model's, or 32 above 64)")
    parser.add_argument("--latency-samples", type=int, default=None,
                        help="kernel measurements that train the latency model")
    parser.add_argument("--latency-dir", default=None,
                        help="latency records and model, shareable across runs "
                             "(default DIR/latency)")
    parser.add_argument("--replace-ops", action="store_true",
                        help="phase 1: replace swish/sigmoid-style activations by hard "
                             "variants first")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip measuring the chosen plan end to end")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT",
                        help="measure latency records on a device of this tracker")
    parser.add_argument("--rpc-key", help="the device key at the tracker")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os

    from npas_tvm.errors import NpasError
    from search.session import SearchConfig, run_search

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise NpasError("--rpc-tracker and --rpc-key go together")
    if args.latency_ms is not None and args.latency_ms <= 0:
        raise NpasError(f"--latency-ms {args.latency_ms}: must be positive")
    if (args.epochs is not None and args.epochs < 1) or args.dense_epochs < 0 \
            or args.final_epochs < 0:
        raise NpasError("--epochs must be >= 1, --dense-epochs and --final-epochs >= 0")
    if args.restart and os.path.exists(os.path.join(args.out, "search_log.jsonl")):
        os.remove(os.path.join(args.out, "search_log.jsonl"))
        shutil.rmtree(os.path.join(args.out, "latency"), ignore_errors=True)
    baselines = tuple(name.strip() for name in args.baselines.split(",") if name.strip())
    config = SearchConfig(
        model=args.model, out=args.out, target=args.target, data=args.data,
        budget=args.budget, latency_ms=args.latency_ms, baselines=baselines,
        method=args.method, epochs=args.epochs, dense_epochs=args.dense_epochs,
        final_epochs=args.final_epochs,
        resolution=args.resolution, latency_samples=args.latency_samples,
        latency_dir=args.latency_dir, replace_ops=args.replace_ops,
        measure=not args.no_measure, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
        threads=args.threads, seed=args.seed, progress=not args.no_progress)
    try:
        outcome = run_search(config)
    except KeyboardInterrupt:
        print(f"interrupted: every finished evaluation is in {args.out}/search_log.jsonl; "
              "run the same command again to continue")
        return 130
    from search.report import summary_table

    print(summary_table(outcome))
    print("wrote " + ", ".join(outcome.files))
    if outcome.plan_path:
        print(f"compile it: npas-tvm compile {outcome.onnx_path} --target {args.target} "
              f"--npas {outcome.plan_path}")
    return 0
