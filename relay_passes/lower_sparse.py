"""Rewrite each annotated layer into a sparse kernel with its packed weights as constants."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from npas_tvm.schemes import SchemeSpec
from relay_passes.sparse_kernels import LayerGeometry, Packed, SparseKernel, sparse_kernel_for
from relay_passes.weights import (WeightUse, attached_params, has_main, pruning_annotations,
                                  static_shape, weight_uses)

_log = logging.getLogger("npas_tvm")
_BLOCKED = re.compile(r"^NCHW(\d+)c$")


@dataclass
class LoweredLayer:
    """What happened to one annotated layer (a row of ``compile --npas``'s table)."""

    name: str
    kind: str
    spec: SchemeSpec
    kernel: str | None        # the sparse kernel's name, None if it stayed dense
    reason: str = ""          # why it stayed dense
    dense_macs: int = 0
    kept_macs: int = 0        # the kept weights' multiply-adds
    computed_macs: int = 0    # the kernel's, padding included (= dense_macs if dense)


@dataclass(frozen=True)
class SparseLayer:
    """An annotated layer with the kernel that will run it (or why none will)."""

    use: WeightUse
    spec: SchemeSpec
    geometry: LayerGeometry
    kernel: SparseKernel | None
    reason: str = ""


def _logical_nchw(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The NCHW shape of a tensor in ``NCHW`` or ``NCHW{c}c``."""
    return shape if layout == "NCHW" else (shape[0], shape[1] * shape[4], shape[2], shape[3])


def geometry_of(use: WeightUse) -> LayerGeometry:
    call = use.call
    if use.op == "matmul":
        return LayerGeometry("matmul", use.kind, use.weight_shape, static_shape(call.args[0]))
    attrs = call.attrs
    return LayerGeometry(
        "conv2d", use.kind, use.weight_shape,
        _logical_nchw(static_shape(call.args[0]), str(attrs.data_layout)),
        tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
        tuple(int(d) for d in attrs.dilation), int(attrs.groups))


def _call_problem(use: WeightUse) -> str | None:
    """What about the call itself (not the scheme) rules a sparse kernel out."""
    call = use.call
    if call.args[0].ty.dtype != "float32":
        return f"data type {call.args[0].ty.dtype} (the sparse kernels are float32)"
    if static_shape(call.args[0]) is None:
        return "the input shape is not static"
    if use.op == "matmul":
        return None if len(static_shape(call.args[0])) >= 2 else "a 1-D matmul input"
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.out_layout))
    if not all(layout == "NCHW" or _BLOCKED.match(layout) for layout in layouts):
        return f"layout {layouts[0]} -> {layouts[1]} (NCHW or NCHW{{c}}c expected)"
    return None


def sparse_layers(func: relax.Function, family: str) -> dict[str, SparseLayer]:
    """Each annotated layer of ``func`` with the kernel ``family`` has for it."""
    specs = pruning_annotations(func)
    found = {}
    for use in weight_uses(func):
        spec = specs.get(use.name)
        if spec is None:
            continue
        geometry = geometry_of(use)
        kernel = sparse_kernel_for(spec.scheme, family)
        if kernel is None:
            reason = f"no {spec.scheme} kernel for {family} targets yet"
        else:
            reason = _call_problem(use) or kernel.unsupported(geometry, spec) or ""
        found[use.name] = SparseLayer(use, spec, geometry, None if reason else kernel, reason)
    return found


def _relayout(tensor, source: str, target: str):
    """``layout_transform`` between ``NCHW`` and ``NCHW{c}c`` layouts (None if equal)."""
    if source == target:
        return None
    src = _BLOCKED.match(source)
    dst = _BLOCKED.match(target)
    a = int(src.group(1)) if src else None
    b = int(dst.group(1)) if dst else None
    if a is None:
        index_map = lambda n, c, h, w: (n, c // b, h, w, c % b)  # noqa: E731
    elif b is None:
        index_map = lambda n, co, h, w, ci: (n, co * a + ci, h, w)  # noqa: E731
    else:
        index_map = lambda n, co, h, w, ci: (  # noqa: E731
            n, (co * a + ci) // b, h, w, (co * a + ci) % b)
    return relax.op.layout_transform(tensor, index_map)


def input_block(channels: int, lanes: int) -> int:
    """The channel block to give an ``NCHW`` input of a sparse conv."""
    from relay_passes.layout import channel_block

    return channel_block(channels, lanes) or channels


@relax.expr_functor.mutator
class _SparseLowerer(relax.PyExprMutator):
    def __init__(self, mod, layers: dict, values: dict, lanes: int, on_layer):
        super().__init__(mod)
        self.layers = layers
        self.values = values
        self.lanes = lanes
        self.on_layer = on_layer
        self.packed: dict[str, Packed] = {}

    def _layer_of(self, call) -> SparseLayer | None:
        for layer in self.layers.values():
            if layer.use.call.same_as(call):
                return layer
        return None

    def visit_call_(self, call):
        layer = self._layer_of(call)
        if layer is None or layer.kernel is None:
            return self.visit_expr_post_order(call)
        use, bb = layer.use, self.builder_
        packed = self.packed.get(use.name)
        if packed is None:
            weight = use.to_scheme_layout(self.values[use.name])
            packed = self.packed[use.name] = layer.kernel.pack(weight, layer.spec,
                                                               layer.geometry)
        self.on_layer(LoweredLayer(use.name, use.kind, layer.spec, layer.kernel.name, "",
                                   layer.geometry.dense_macs(), packed.kept_macs,
                                   packed.computed_macs))
        data = self.visit_expr(call.args[0])
        if use.op == "matmul":
            return self._matmul(layer, bb, data, packed)
        layout = str(call.attrs.data_layout)
        if layout == "NCHW":
            block = input_block(layer.geometry.data_shape[1], self.lanes)
            data = bb.emit(_relayout(data, "NCHW", f"NCHW{block}c"))
        else:
            block = int(_BLOCKED.match(layout).group(1))
        result = layer.kernel.conv2d(bb, data, block, packed, layer.geometry)
        produced = f"NCHW{layer.kernel.output_block(layer.spec)}c"
        relayout = _relayout(bb.emit(result), produced, str(call.attrs.out_layout)) \
            if produced != str(call.attrs.out_layout) else None
        return relayout if relayout is not None else result

    def _matmul(self, layer: SparseLayer, bb, data, packed):
        shape = layer.geometry.data_shape
        rows = 1
        for extent in shape[:-1]:
            rows *= extent
        if len(shape) != 2:
            data = bb.emit(relax.op.reshape(data, (rows, shape[-1])))
        result = layer.kernel.matmul(bb, data, packed, layer.geometry)
        if len(shape) != 2:
            return relax.op.reshape(bb.emit(result), (*shape[:-1], layer.geometry.out_channels))
        return result


@tvm.transform.module_pass(opt_level=0, name="LowerToSparseKernels")
class LowerToSparseKernels:
    """Replace each annotated conv2d/matmul by its scheme's sparse kernel.

    For every layer annotated by :class:`AnnotatePruning` / :class:`DetectSparsity`,
    the registered :class:`~relay_passes.sparse_kernels.SparseKernel` of the target's
    family packs the (pruned) weight into compact arrays, which become constants of a
    ``call_tir`` of the kernel. Bias, activation and residual add after it stay Relax
    ops, which fusion then puts into the kernel's epilogue. Run after the layout pass:
    a sparse conv then reads and writes its neighbours' blocked layout, with no
    transform where its block (the kernel's vector of filters) is that layout's block
    (the rule mapper picks block rows of the SIMD width for this); otherwise, and on
    ``NCHW`` convs, the pass places the transforms itself. A layer whose
    scheme has no kernel, or whose shape the kernel does not cover, stays dense with a
    warning naming the layer.

    ``on_layer`` (optional) receives a :class:`LoweredLayer` per annotated layer.

    Example::

        # w: block_punched 5x, block (16, 4); x in NCHW16c
        y = R.nn.conv2d(x, R.layout_transform(w, ...), data_layout="NCHW16c", ...)
        # becomes
        y = R.call_tir(sparse_conv2d_nchwc, (x, values, taps, counts), ...)   # NCHW16c
    """

    def __init__(self, spec, on_layer: Callable[[LoweredLayer], None] | None = None):
        self.spec = spec
        self.on_layer = on_layer or (lambda row: None)

    def transform_module(self, mod, ctx):
        if not has_main(mod):
            return mod
        func = mod["main"]
        layers = sparse_layers(func, self.spec.family)
        if not layers:
            return mod
        values = attached_params(func)
        for layer in layers.values():
            if layer.kernel is None:
                _log.warning("layer %r (%s %gx): %s; it stays dense", layer.use.name,
                             layer.spec.scheme, layer.spec.rate, layer.reason)
                macs = layer.geometry.dense_macs()
                weight = values[layer.use.name]
                kept = macs * int(np.count_nonzero(weight)) // weight.size
                self.on_layer(LoweredLayer(layer.use.name, layer.use.kind, layer.spec, None,
                                           layer.reason, macs, kept, macs))
        if all(layer.kernel is None for layer in layers.values()):
            return mod
        lanes = max(int(getattr(self.spec, "simd_lanes", 4) or 4), 4)
        lowerer = _SparseLowerer(mod, layers, values, lanes, self.on_layer)
        main = mod.get_global_var("main")
        lowerer.builder_.update_func(main, lowerer.visit_expr(func))
        # the builder's module holds the kernels' PrimFuncs added by call_te
        return relax.transform.DeadCodeElimination()(lowerer.builder_.get())
