"""``npas-tvm prune MODEL.onnx --plan plan.json|rule -o pruned.onnx``."""

from __future__ import annotations

from npas_tvm.commands._model import add_model_arguments, load_layers


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "prune", parents=[common], help="apply a pruning plan's masks to an ONNX model",
        description="Mask the weights of MODEL by a plan and write an ONNX model that "
                    "onnxruntime runs; print a per-layer table.")
    add_model_arguments(parser)
    parser.add_argument("--plan", required=True, metavar="PLAN.json|rule",
                        help="a plan file, or 'rule' for the rule-based mapping")
    parser.add_argument("--rate", type=float, default=None,
                        help="with --plan rule: the target rate (default 3)")
    parser.add_argument("-o", "--output", required=True, help="the pruned .onnx to write")
    parser.set_defaults(func=run)


def run(args) -> int:
    import onnx

    from npas_tvm.plan import validate_plan
    from npas_tvm.pruning import prune_proto, save_model

    _, layers = load_layers(args)
    plan, source = plan_from_arg(args.plan, args.rate, layers)
    validate_plan(plan, layers, source)
    proto = onnx.load(args.model)  # as given: the graph and its input shapes unchanged
    report = prune_proto(proto, layers, plan)
    save_model(proto, args.output)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def plan_from_arg(value: str, rate: float | None, layers):
    """(plan, source name) for ``--plan``: a file, or ``rule`` with ``--rate``."""
    from npas_tvm.errors import PlanError
    from npas_tvm.plan import load_plan

    if value == "rule":
        from search.rule_mapper import rule_plan

        return rule_plan(layers, 3.0 if rate is None else rate), "rule plan"
    if rate is not None:
        raise PlanError(f"--rate applies to --plan rule; {value} sets its own rates")
    return load_plan(value), value
