"""``npas-tvm inspect MODEL.onnx``: per layer, sparsity and the strongest scheme."""

from __future__ import annotations

from npas_tvm.commands._model import add_model_arguments, load_layers


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "inspect", parents=[common], help="show each layer's sparsity and pruning scheme",
        description="For every prunable layer of MODEL: its sparsity and the most "
                    "structured pruning scheme (with block and rate) that its zeros follow.")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.pruning import format_inspect_table, inspect_proto

    model, layers = load_layers(args)
    print(format_inspect_table(inspect_proto(model.proto, layers)))
    return 0
