"""``npas-tvm latency MODEL.onnx --plan P.json --target T``: predicted vs measured latency.

Builds the search's latency model for MODEL and the target (:mod:`search.latency`:
layer records measured here or on an RPC device, kept in the work dir and reused), then
prints each layer's predicted time under the plan, the model's predicted total, and
the total measured end to end (pruned, built as ``compile --npas`` builds, timed).
"""

from __future__ import annotations


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "latency", parents=[common],
        help="predict a plan's latency with the search's latency model, and measure it",
        description="Predict (per layer and in total) and measure the latency of MODEL "
                    "pruned by a plan on a target.")
    parser.add_argument("model", help="the ONNX file")
    parser.add_argument("--plan", required=True, metavar="PLAN.json|rule|dense",
                        help="the pruning plan: a plan file, `rule` (rule-based at 3x for "
                             "the target) or `dense`")
    parser.add_argument("--target", default="host", help="host, arm-cpu, mali, ...")
    parser.add_argument("--work-dir", default="latency-work", metavar="DIR",
                        help="where the layer records and the trained model are kept "
                             "(default latency-work)")
    parser.add_argument("--records", metavar="FILE.jsonl",
                        help="a layer records file to use (and extend) instead of "
                             "DIR/latency_records.jsonl; models may share one")
    parser.add_argument("--samples", type=int, default=None,
                        help="layer records to measure for this model (default 150)")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT",
                        help="measure on a device of this tracker")
    parser.add_argument("--rpc-key", help="the device key at the tracker")
    parser.add_argument("--no-measure", action="store_true",
                        help="predict only; do not build and time the pruned model")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.layers import load_model_layers
    from npas_tvm.targets import resolve_target
    from search.latency import _resolve_plan, load_or_build, measure_plan_ms

    spec = resolve_target(args.target)
    _, layers = load_model_layers(args.model)
    plan = _resolve_plan(args.plan, layers, spec)  # a bad plan fails before measuring
    model = load_or_build(args.model, args.target, args.work_dir, samples=args.samples,
                          rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                          records=args.records)
    times = model.predict_layers(layers, plan)
    width = max(len("layer"), *(len(layer.name) for layer in layers))
    print(f"{'layer':<{width}}  {'scheme':<14} {'block':<10} {'rate':>6}  {'predicted ms':>12}")
    for layer, ms in zip(layers, times):
        spec_ = plan.spec_for(layer.name)
        print(f"{layer.name:<{width}}  {spec_.scheme:<14} {spec_.describe() or '-':<10} "
              f"{spec_.rate:>5.2f}x  {ms:>12.4f}")
    predicted = sum(times) + model.base_ms
    print(f"{'non-prunable remainder':<{width}}  {'':<14} {'':<10} {'':>6}  "
          f"{model.base_ms:>12.4f}")
    print(f"predicted: {predicted:.3f} ms (target {model.target}, {model.threads or 'device'} "
          f"threads)")
    if args.no_measure:
        return 0
    measured = measure_plan_ms(args.model, plan, args.target, rpc_tracker=args.rpc_tracker,
                               rpc_key=args.rpc_key)
    print(f"measured:  {measured:.3f} ms end to end; predicted / measured = "
          f"{predicted / measured:.2f}")
    return 0
