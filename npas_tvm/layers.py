"""The prunable layers of an ONNX model, described once for the plan, ``prune``,
``inspect`` and the graph passes.

A prunable layer is a Conv with a constant weight, or a Gemm / MatMul whose second
operand is a constant weight. It is named by its weight initializer (unique and stable
in ONNX: the plan's key). Weights are described in the schemes' layout: conv
[F, C/groups, kh, kw], GEMM [out, in] (a MatMul's or a Gemm's ``transB=0`` weight is
stored [in, out]; :meth:`Layer.to_scheme_layout` transposes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npas_tvm.schemes import CONV, CONV1X1, DEPTHWISE, FC, GROUPED, KIND_TEXT

# Ops through which an output channel stays the same channel, elementwise (for the
# consumers that a removed filter shrinks). Binary ops join two tensors and stop the walk.
CHANNEL_PRESERVING_OPS = frozenset({
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "PRelu", "Elu",
    "Selu", "Tanh", "Softplus", "Gelu", "Mish", "BatchNormalization", "Identity", "Dropout",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Cast"})


@dataclass
class Layer:
    """One prunable layer."""

    name: str                      # the weight initializer's name (the plan key)
    node: str                      # the ONNX node's name (or its index)
    op_type: str                   # Conv, Gemm, MatMul
    kind: str                      # conv, conv1x1, depthwise, grouped, fc
    weight_shape: tuple[int, ...]  # in the schemes' layout
    groups: int = 1
    strides: tuple[int, ...] = ()
    output_spatial: tuple[int, ...] = ()  # conv output H, W (for MACs)
    rows: int = 1                  # GEMM rows per weight use (batch x leading dims)
    transposed: bool = False       # stored [in, out]: MatMul, Gemm transB=0
    bias: str | None = None        # the bias initializer, if any
    first: bool = False            # no prunable layer before it
    last: bool = False             # no prunable layer after it
    consumers: list[str] = field(default_factory=list)
    """Layers reading this layer's output channels directly (through channel-preserving
    ops only), whose input channels shrink when this layer loses filters. Empty when the
    output meets another tensor first (residual add, concat, gating multiply)."""

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def macs(self) -> int:
        """Multiply-accumulates for one inference (batch as the model's input gives)."""
        spatial = int(np.prod(self.output_spatial)) if self.output_spatial else 1
        return self.params * spatial * self.rows

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def description(self) -> str:
        return KIND_TEXT[self.kind]

    def to_scheme_layout(self, stored: np.ndarray) -> np.ndarray:
        return stored.T if self.transposed else stored

    def from_scheme_layout(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transposed else array


def _attribute(node, name: str, default):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _shapes(proto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every value ONNX shape inference can give."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # a model over 2 GB or a failed inference: MACs need not block
        inferred = proto
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def conv_kind(weight_shape: tuple[int, ...], groups: int) -> str:
    out_channels, per_group = weight_shape[0], weight_shape[1]
    if groups == 1:
        return CONV1X1 if weight_shape[2:] == (1, 1) else CONV
    if per_group == 1 and out_channels % groups == 0:
        return DEPTHWISE
    return GROUPED


def extract_layers(proto) -> list[Layer]:
    """The prunable layers of ``proto`` in graph order, with kinds, MACs, first/last
    flags and direct consumers. Pass a model whose input shapes are static (as
    ``model_io.load_onnx`` gives) for MACs; unknown shapes count one output position."""
    initializers = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    shapes = _shapes(proto)
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers: list[Layer] = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in initializers or uses.get(weight, 0) != 1:
            continue  # computed or shared weights are not pruned
        stored = initializers[weight]
        label = node.name or str(index)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in initializers else None
        if node.op_type == "Conv":
            if len(stored) != 4:
                continue  # 1-D / 3-D convolutions are not covered by the schemes
            groups = int(_attribute(node, "group", 1))
            output = shapes.get(node.output[0], ())
            layers.append(Layer(weight, label, "Conv", conv_kind(stored, groups), stored,
                                groups=groups, strides=tuple(_attribute(node, "strides", ())),
                                output_spatial=tuple(output[2:]),
                                rows=output[0] if output else 1, bias=bias))
            continue
        if len(stored) != 2:
            continue
        if node.op_type == "Gemm":
            if _attribute(node, "transA", 0) or float(_attribute(node, "alpha", 1.0)) == 0:
                continue
            transposed = not _attribute(node, "transB", 0)
        else:
            transposed, bias = True, None
        shape = stored[::-1] if transposed else stored
        data = shapes.get(node.input[0], ())
        rows = int(np.prod(data[:-1])) if len(data) >= 2 else 1
        layers.append(Layer(weight, label, node.op_type, FC, tuple(shape), rows=rows,
                            transposed=transposed, bias=bias))
    _link(proto, layers)
    return layers


def load_model_layers(path: str, input_shapes: dict[str, tuple[int, ...]] | None = None):
    """Load an ONNX file (clear errors, static input shapes) and its prunable layers."""
    from npas_tvm.errors import ModelError
    from npas_tvm.model_io import load_onnx

    model = load_onnx(path, input_shapes, check_ops=False)
    layers = extract_layers(model.proto)
    if not layers:
        raise ModelError(f"{path}: no prunable layers (Conv, Gemm or MatMul with a constant "
                         "weight initializer)")
    return model, layers


def _link(proto, layers: list[Layer]) -> None:
    """Set first/last flags (reachability between layers) and direct consumers."""
    nodes = {(node.name or str(index)): node for index, node in enumerate(proto.graph.node)}
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layer_of_node = {id(nodes[layer.node]): layer for layer in layers}
    shapes = _shapes(proto)
    reached: set[str] = set()
    for layer in layers:
        output = nodes[layer.node].output[0]
        after = _walk(output, readers, layer_of_node, shapes, channel_only=False)
        layer.last = not after
        reached.update(other.name for other in after)
        direct = _walk(output, readers, layer_of_node, shapes, channel_only=True)
        layer.consumers = [other.name for other in direct or []]
    for layer in layers:
        layer.first = layer.name not in reached


def _walk(start: str, readers, layer_of_node, shapes, channel_only: bool) -> list[Layer] | None:
    """The layers first met on every path from tensor ``start``. With ``channel_only``,
    paths may pass only channel-preserving ops; None if one meets anything else."""
    found, stack, seen = [], [start], set()
    while stack:
        tensor = stack.pop()
        for node in readers.get(tensor, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            layer = layer_of_node.get(id(node))
            if layer is not None and node.input[0] == tensor:
                found.append(layer)
            elif not channel_only or node.op_type in CHANNEL_PRESERVING_OPS or (
                    node.op_type == "Flatten" and _flattens_channels(shapes, tensor)):
                stack.extend(node.output)
            else:
                return None
    return found


def _flattens_channels(shapes: dict[str, tuple[int, ...]], tensor: str) -> bool:
    """Flatten keeps channel identity only on [N, C, 1, 1] (after global pooling)."""
    shape = shapes.get(tensor, ())
    return len(shape) >= 2 and all(d == 1 for d in shape[2:])
