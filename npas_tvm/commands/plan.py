"""``npas-tvm plan MODEL.onnx --rule [--rate 3] -o plan.json``."""

from __future__ import annotations

from npas_tvm.commands._model import add_model_arguments, load_layers


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "plan", parents=[common], help="write a pruning plan for a model",
        description="Map pruning schemes, blocks and rates to the layers of MODEL and write "
                    "the plan JSON that `prune` and `compile --npas` read.")
    add_model_arguments(parser)
    parser.add_argument("--rule", action="store_true",
                        help="rule-based mapping by layer type and shape (TODAES'22)")
    parser.add_argument("--rate", type=float, default=3.0,
                        help="target rate, total / kept weights (default 3)")
    parser.add_argument("-o", "--output", required=True, help="the plan .json to write")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.errors import NpasError
    from npas_tvm.plan import save_plan
    from search.rule_mapper import rule_choices, rule_plan

    if not args.rule:
        raise NpasError("plan: choose a mapping method: --rule (rule-based, by layer type "
                        "and shape)")
    _, layers = load_layers(args)
    choices = rule_choices(layers, args.rate)
    width = max(len("layer"), *(len(layer.name) for layer in layers))
    print(f"{'layer':<{width}}  {'kind':<9} {'shape':<16} {'scheme':<15} {'block':<9} "
          f"{'rate':>5}  rule")
    for layer, choice in zip(layers, choices):
        shape = "x".join(map(str, layer.weight_shape))
        print(f"{layer.name:<{width}}  {layer.kind:<9} {shape:<16} {choice.spec.scheme:<15} "
              f"{choice.spec.describe() or '-':<9} {choice.spec.rate:>5.2f}  {choice.reason}")
    plan = rule_plan(layers, args.rate)
    save_plan(plan, args.output)
    pruned = sum(spec.scheme != "dense" for spec in plan.layers.values())
    print(f"wrote {args.output} ({len(layers)} layers, {pruned} pruned)")
    return 0
