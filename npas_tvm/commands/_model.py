"""What the model-reading commands (plan, prune, inspect) share: the model argument."""

from __future__ import annotations


def add_model_arguments(parser) -> None:
    parser.add_argument("model", help="the ONNX file")
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="fix an input's shape (for MACs); a dynamic batch counts as 1")


def load_layers(args):
    """(LoadedModel, prunable layers) of ``args.model`` with its ``--input-shape``s."""
    from npas_tvm.layers import load_model_layers
    from npas_tvm.model_io import parse_input_shapes

    return load_model_layers(args.model, parse_input_shapes(args.input_shape))
