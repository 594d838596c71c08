"""Blocked ``NCHW{c}c`` layouts for convolutions, and their legalization to our kernels.

:class:`BlockedConvLayout` asks Relax's ``ConvertLayout`` for a blocked layout per
conv2d (the block ``c`` is the SIMD width, or the largest smaller power of two that
divides the channels). ``ConvertLayout`` then carries the layout through elementwise
ops, pools and reductions and only places a ``layout_transform`` where a consumer
cannot take it, so consecutive convs (and their bias/ReLU/residual adds) stay
blocked. The transforms of constant weights are folded away by ``FoldConstant``:
weights are pre-packed at compile time.

:class:`LegalizeBlockedConv2d` lowers the blocked conv2d calls to our compute
definitions (:mod:`tir_schedules.conv2d`); any other conv2d keeps TVM's
default legalization.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax

from relay_passes.weights import static_shape
from tir_schedules import conv2d as conv_kernels

_BLOCKED = re.compile(r"^NCHW(\d+)c$")
_BLOCKED_KERNEL = re.compile(r"^OIHW(\d+)i(\d+)o$")


def channel_block(channels: int, lanes: int, smallest: int = 4) -> int | None:
    """The largest power of two ``<= lanes`` (and ``>= smallest``) dividing ``channels``."""
    block = lanes
    while block >= smallest:
        if channels % block == 0:
            return block
        block //= 2
    return None


def conv2d_layouts(call, lanes: int) -> list[str] | None:
    """The ``[data, kernel, output]`` layouts for a conv2d call, or None to keep NCHW.

    Dense and grouped convs: ``NCHW{ib}c``/``OIHW{ib}i{ob}o``/``NCHW{ob}c``, where the
    input block may be the whole (small) input channel count, as for an RGB image.
    Depthwise (multiplier 1): ``NCHW{c}c``/``OIHW1i{c}o``.
    """
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    data_shape, kernel_shape = static_shape(call.args[0]), static_shape(call.args[1])
    if data_shape is None or kernel_shape is None or call.args[0].ty.dtype != "float32":
        return None
    in_channels, out_channels, groups = data_shape[1], kernel_shape[0], int(attrs.groups)
    if groups == in_channels == out_channels and kernel_shape[1] == 1:
        block = channel_block(in_channels, lanes)
        return None if block is None else [f"NCHW{block}c", f"OIHW1i{block}o", f"NCHW{block}c"]
    group_in, group_out = in_channels // groups, out_channels // groups
    out_block = channel_block(group_out, lanes)
    in_block = channel_block(group_in, lanes)
    if in_block is None and groups == 1 and in_channels <= lanes:
        in_block = in_channels
    if out_block is None or in_block is None:
        return None
    return [f"NCHW{in_block}c", f"OIHW{in_block}i{out_block}o", f"NCHW{out_block}c"]


def BlockedConvLayout(lanes: int) -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """``ConvertLayout`` with a blocked layout chosen per conv2d (see :func:`conv2d_layouts`).

    Example (``lanes=16``)::

        y = R.nn.conv2d(x, w)                     # x: (1, 32, 56, 56), w: (64, 32, 1, 1)
        # becomes
        xb = R.layout_transform(x, ...)           # (1, 2, 56, 56, 16)
        wb = R.layout_transform(w, ...)           # (4, 2, 1, 1, 16, 16), folded later
        yb = R.nn.conv2d(xb, wb, data_layout="NCHW16c", kernel_layout="OIHW16i16o")
        y = R.layout_transform(yb, ...)           # only where a consumer needs NCHW
    """

    def convert(mod, block_lanes: int):
        def desired(call):
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
                layouts = conv2d_layouts(call, block_lanes)
                if layouts is not None:
                    return {"relax.nn.conv2d": layouts}
            return {}

        return relax.transform.ConvertLayout({}, desired)(mod)

    @tvm.transform.module_pass(opt_level=0, name="BlockedConvLayout")
    def blocked(mod, ctx):
        try:
            return convert(mod, lanes)
        except tvm.error.InternalError:
            # ConvertLayout fails on a channel concat of differently blocked inputs
            # (e.g. 16 and 12 channels): one block that divides every conv's channels
            block = channel_block(_channels_gcd(mod), lanes)
            if block is None:
                return mod  # plain NCHW: TVM's convolutions, correct but unblocked
            return convert(mod, block)

    return blocked


def _channels_gcd(mod) -> int:
    """The gcd of every conv2d's input and output channel counts in ``mod``."""
    import math

    found = [0]

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
                and expr.op.name == "relax.nn.conv2d":
            data, kernel = static_shape(expr.args[0]), static_shape(expr.args[1])
            if data is not None and kernel is not None:
                found[0] = math.gcd(found[0], data[1], kernel[0])

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found[0]


def _legalize_conv2d(bb: relax.BlockBuilder, call):
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    attrs = call.attrs
    data_match = _BLOCKED.match(str(attrs.data_layout))
    kernel_match = _BLOCKED_KERNEL.match(str(attrs.kernel_layout))
    out_match = _BLOCKED.match(str(attrs.out_layout))
    if not (data_match and kernel_match and out_match):
        return _nn_conv2d(bb, call)
    strides = [int(s) for s in attrs.strides]
    padding = [int(p) for p in attrs.padding]
    dilation = [int(d) for d in attrs.dilation]
    groups = int(attrs.groups)
    data, kernel = call.args
    if groups > 1 and kernel_match.group(1) == "1" and groups == static_shape(data)[1] * int(
            data_match.group(1)):
        return bb.call_te(conv_kernels.depthwise_conv2d_nchwc, data, kernel, strides, padding,
                          dilation, primfunc_name_hint="depthwise_conv2d_nchwc")
    return bb.call_te(conv_kernels.conv2d_nchwc, data, kernel, strides, padding, dilation,
                      groups, primfunc_name_hint="conv2d_nchwc")


def LegalizeBlockedConv2d() -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Legalize blocked-layout conv2d to :mod:`tir_schedules.conv2d` kernels.

    Runs TVM's ``LegalizeOps`` with only conv2d customized: blocked calls become
    ``call_tir`` of ``conv2d_nchwc``/``depthwise_conv2d_nchwc`` (blocks named
    ``npas_*``, which the schedule pass recognizes after fusion); the rest of the
    graph is legalized as usual.
    """
    return relax.transform.LegalizeOps({"relax.nn.conv2d": _legalize_conv2d})
