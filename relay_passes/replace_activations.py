"""NPAS phase 1 in the graph: replace mobile-unfriendly activations by piecewise-linear ones.

A sigmoid costs an exponential and a division per element, and swish (``x * sigmoid(x)``,
SiLU) the same plus a multiply: on a phone CPU these dominate the cheap elementwise
epilogues of the convolutions. This optional pass swaps them for the hard versions
MobileNetV3 uses, written with ops every backend fuses (add, multiply, clip)::

    swish(x)   = x * sigmoid(x)   ->  hardswish(x)   = x * clip(x + 3, 0, 6) / 6
    silu(x)    (R.nn.silu)        ->  hardswish(x)
    sigmoid(x) (gates)            ->  hardsigmoid(x) = clip(x / 6 + 0.5, 0, 1)

It changes the model's numerics (within 0.15 of swish, 0.1 of sigmoid), so it belongs to
the search, which fine-tunes the model with the same replacement on the torch side
(``search.replace_ops.replace_mobile_unfriendly``); it is not in the default pipeline.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard


def _dtype(expr) -> str:
    return expr.ty.dtype


def hardswish(x):
    """``x * clip(x + 3, 0, 6) / 6`` (the ONNX frontend's HardSwish, the same ops)."""
    dtype = _dtype(x)
    gate = relax.op.clip(relax.op.add(x, relax.const(3.0, dtype)), 0, 6)
    return relax.op.multiply(x, relax.op.divide(gate, relax.const(6.0, dtype)))


def hardsigmoid(x):
    """``clip(x / 6 + 0.5, 0, 1)`` (ONNX HardSigmoid with alpha 1/6, beta 0.5)."""
    dtype = _dtype(x)
    scaled = relax.op.multiply(x, relax.const(1.0 / 6.0, dtype))
    return relax.op.clip(relax.op.add(scaled, relax.const(0.5, dtype)), 0, 1)


def _swish_pattern():
    x = wildcard()
    gate = is_op("relax.sigmoid")(x)
    swish = is_op("relax.multiply")(x, gate) | is_op("relax.multiply")(gate, x)
    return x, swish | is_op("relax.nn.silu")(x)


def _is_float(expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and str(info.dtype).startswith("float")


@tvm.transform.module_pass(opt_level=0, name="ReplaceMobileUnfriendlyOps")
class ReplaceMobileUnfriendlyOps:
    """Rewrite swish / SiLU to hard-swish and the remaining sigmoids to hard-sigmoid in
    every Relax function. ``sigmoid=False`` keeps sigmoids that are not part of a swish
    (e.g. a squeeze-excite gate, or an output that must stay a probability).

    Example::

        lv = R.sigmoid(x); gv = R.multiply(x, lv)     # swish, as ONNX exports SiLU
        # becomes
        lv1 = R.add(x, 3); lv2 = R.clip(lv1, 0, 6); lv3 = R.divide(lv2, 6)
        gv = R.multiply(x, lv3)

    ``replaced`` counts the rewrites of the last run: ``{"hardswish": n, "hardsigmoid": m}``.
    """

    def __init__(self, sigmoid: bool = True):
        self.sigmoid = sigmoid
        self.replaced = {"hardswish": 0, "hardsigmoid": 0}

    def transform_module(self, mod, ctx):
        self.replaced = {"hardswish": 0, "hardsigmoid": 0}
        x, swish = _swish_pattern()
        y = wildcard()
        sigmoid = is_op("relax.sigmoid")(y)

        def to_hardswish(expr, matches):
            if not _is_float(matches[x]):
                return expr
            self.replaced["hardswish"] += 1
            return hardswish(matches[x])

        def to_hardsigmoid(expr, matches):
            if not _is_float(matches[y]):
                return expr
            self.replaced["hardsigmoid"] += 1
            return hardsigmoid(matches[y])

        out = tvm.IRModule({}, attrs=mod.attrs)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                func = rewrite_call(swish, to_hardswish, func)
                if self.sigmoid:
                    func = rewrite_call(sigmoid, to_hardsigmoid, func)
                func = relax.analysis.remove_all_unused(func)
            out[gvar] = func
        return relax.transform.Normalize()(out)
