"""``npas-tvm zoo list|export``: the built-in models."""

from __future__ import annotations


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("zoo", parents=[common], help="built-in models")
    actions = parser.add_subparsers(dest="zoo_action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="list the models").set_defaults(
        func=run_list)
    export = actions.add_parser("export", parents=[common], help="export a model to ONNX")
    export.add_argument("name")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--seed", type=int, default=0, help="weight initialization seed")
    export.add_argument("--dynamic-batch", action="store_true",
                        help="leave the batch dimension symbolic")
    export.set_defaults(func=run_export)


def run_list(args) -> int:
    from npas_tvm.zoo import ZOO_NAMES, zoo_entry

    for name in ZOO_NAMES:
        entry = zoo_entry(name)
        shape = "x".join(map(str, entry.input_shape))
        print(f"{name:<20} {shape:<14} {entry.description}")
    return 0


def run_export(args) -> int:
    from npas_tvm.errors import NpasError
    from npas_tvm.zoo import export_zoo_model

    if not 13 <= args.opset <= 21:
        raise NpasError(f"--opset {args.opset}: choose an opset from 13 to 21")
    path = export_zoo_model(args.name, args.output, args.seed, args.opset, args.dynamic_batch)
    print(f"wrote {path}")
    return 0
