"""Tiny ONNX graphs for the tests: conv / gemm / elementwise nodes with random weights."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


class Graph:
    """A tiny ONNX graph builder: conv / gemm / elementwise nodes with random weights."""

    def __init__(self, shape, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.shape = [], [], shape
        self.last, self.count, self.layers = "x", 0, 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _layer(self, prefix: str) -> str:
        self.layers += 1
        return f"{prefix}{self.layers}"

    def weight(self, name: str, shape) -> str:
        value = (self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype("float32")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
             groups: int = 1, bias: bool = True, pad: int | None = None) -> str:
        in_channels = self.shape[1]
        name = self._layer("conv")
        inputs = [self.last, self.weight(f"{name}.weight",
                                         (out_channels, in_channels // groups, kernel, kernel))]
        if bias:
            inputs.append(self.weight(f"{name}.bias", (out_channels,)))
        pad = dilation * (kernel // 2) if pad is None else pad
        out = self._name("t")
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], kernel_shape=[kernel, kernel], strides=[stride, stride],
            dilations=[dilation, dilation], pads=[pad] * 4, group=groups))
        n, _, h, w = self.shape
        size = lambda s: (s + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1  # noqa: E731
        self.shape = (n, out_channels, size(h), size(w))
        self.last = out
        return out

    def op(self, op_type: str, *extra, **attrs) -> str:
        out = self._name("t")
        self.nodes.append(helper.make_node(op_type, [self.last, *extra], [out], **attrs))
        self.last = out
        return out

    def relu6(self) -> str:
        low, high = self._name("lo"), self._name("hi")
        self.inits += [numpy_helper.from_array(np.array(0, "float32"), low),
                       numpy_helper.from_array(np.array(6, "float32"), high)]
        return self.op("Clip", low, high)

    def flatten(self) -> str:
        self.op("GlobalAveragePool")
        out = self.op("Flatten")
        self.shape = (self.shape[0], self.shape[1])
        return out

    def gemm(self, out_features: int, transposed: bool = True) -> str:
        name = self._layer("fc")
        k = self.shape[1]
        if transposed:
            weight = self.weight(f"{name}.weight", (out_features, k))
            out = self.op("Gemm", weight, self.weight(f"{name}.bias", (out_features,)),
                          transB=1)
        else:
            out = self.op("MatMul", self.weight(f"{name}.weight", (k, out_features)))
        self.shape = (self.shape[0], out_features)
        return out

    def save(self, path) -> str:
        import onnx

        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [1, *self.input_shape[1:]])],
            [helper.make_tensor_value_info(self.last, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, str(path))
        return str(path)


def make_graph(shape=(1, 16, 12, 12)) -> Graph:
    graph = Graph(shape)
    graph.input_shape = shape
    return graph


def small_cnn(path) -> str:
    """conv3x3 -> relu6 -> conv1x1 (+ residual) -> depthwise -> conv3x3/2 -> fc."""
    g = make_graph()
    g.conv(32)
    skip = g.relu6()
    g.conv(32, kernel=1)
    g.op("Add", skip)
    g.conv(32, groups=32)
    g.op("Relu")
    g.conv(64, stride=2, bias=False)
    g.flatten()
    g.gemm(24)
    return g.save(path)
