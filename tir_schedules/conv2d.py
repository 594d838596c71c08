"""Blocked-layout 2-D convolution: the math (TE) and its CPU schedule.

Data is ``NCHW{c}c`` (``[N, C/c, H, W, c]``), weights ``OIHW{c}i{c}o``
(``[O/c, I/c, KH, KW, c, c]``; depthwise ``OIHW1i{c}o``), output ``NCHW{c}c``. Along
the innermost ``c`` output channels every FMA is a full vector whatever the stride or
kernel size, which is why the layout exists: a register tile of output-channel blocks
x output columns is accumulated in vector registers, the input is broadcast one
channel at a time and the weights are loaded as vectors.

The schedule is one template for every CPU; a target family differs only in its
:class:`~tir_schedules.config.CpuScheduleConfig`.
"""

from __future__ import annotations

from typing import Sequence

from tir_schedules.common import (choose_register_tile, find_block, fuse_epilogue,
                                           loop_extents)
from tir_schedules.config import CpuScheduleConfig

PAD_BLOCK = "npas_conv_pad"
CONV_BLOCK = "npas_conv2d_nchwc"
DEPTHWISE_BLOCK = "npas_depthwise_conv2d_nchwc"


def _pad(data, padding: Sequence[int]):
    from tvm import topi

    top, left, bottom, right = (int(p) for p in padding)
    if not (top or left or bottom or right):
        return data
    return topi.nn.pad(data, (0, 0, top, left, 0), (0, 0, bottom, right, 0), name=PAD_BLOCK)


def _output_size(size: int, kernel: int, stride: int, dilation: int, pad: int) -> int:
    return (size + pad - (kernel - 1) * dilation - 1) // stride + 1


def conv2d_nchwc(data, kernel, strides: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int = 1):
    """Grouped (``groups=1``: dense) convolution, blocked layouts in and out.

    ``kernel`` is ``[O/ob, (I/groups)/ib, KH, KW, ib, ob]``; each output-channel
    block must lie within one group (``(O/groups) % ob == 0``).
    """
    from tvm import te

    n, in_chunks, height, width, in_block = (int(v) for v in data.shape)
    out_chunks, group_in_chunks, kh_size, kw_size, _, out_block = (int(v) for v in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    out_h = _output_size(height, kh_size, sh, dh, padding[0] + padding[2])
    out_w = _output_size(width, kw_size, sw, dw, padding[1] + padding[3])
    group_out_chunks = out_chunks // groups
    padded = _pad(data, padding)
    ic = te.reduce_axis((0, group_in_chunks), name="ic")
    kh = te.reduce_axis((0, kh_size), name="kh")
    kw = te.reduce_axis((0, kw_size), name="kw")
    ib = te.reduce_axis((0, in_block), name="ib")

    def in_chunk(oc):
        return ic if groups == 1 else oc // group_out_chunks * group_in_chunks + ic

    return te.compute(
        (n, out_chunks, out_h, out_w, out_block),
        lambda b, oc, oh, ow, o: te.sum(
            padded[b, in_chunk(oc), oh * sh + kh * dh, ow * sw + kw * dw, ib]
            * kernel[oc, ic, kh, kw, ib, o], axis=[ic, kh, kw, ib]),
        name=CONV_BLOCK)


def depthwise_conv2d_nchwc(data, kernel, strides: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int]):
    """Depthwise convolution (multiplier 1); ``kernel`` is ``[C/c, 1, KH, KW, 1, c]``."""
    from tvm import te

    n, chunks, height, width, block = (int(v) for v in data.shape)
    _, _, kh_size, kw_size, _, _ = (int(v) for v in kernel.shape)
    (sh, sw), (dh, dw) = strides, dilation
    out_h = _output_size(height, kh_size, sh, dh, padding[0] + padding[2])
    out_w = _output_size(width, kw_size, sw, dw, padding[1] + padding[3])
    padded = _pad(data, padding)
    kh = te.reduce_axis((0, kh_size), name="kh")
    kw = te.reduce_axis((0, kw_size), name="kw")
    return te.compute(
        (n, chunks, out_h, out_w, block),
        lambda b, c, oh, ow, i: te.sum(
            padded[b, c, oh * sh + kh * dh, ow * sw + kw * dw, i] * kernel[c, 0, kh, kw, 0, i],
            axis=[kh, kw]),
        name=DEPTHWISE_BLOCK)


def _finish_tile(sch, out_block, at_loop, depth: int) -> None:
    """Place the epilogue at the register tile (``at_loop``, the ``depth``-th loop):
    unrolled, and vectorized along the channel block."""
    sch.reverse_compute_at(out_block, at_loop)
    tile_loops = sch.get_loops(out_block)[depth:]
    for loop in tile_loops[:-1]:
        sch.unroll(loop)
    sch.vectorize(tile_loops[-1])


def _place_pad(sch, pad, outer) -> None:
    if pad is None:
        return
    sch.compute_at(pad, outer)
    sch.vectorize(sch.get_loops(pad)[-1])


def schedule_conv2d_nchwc(sch, cfg: CpuScheduleConfig) -> None:
    """Register-tiled, vectorized, parallel schedule of a (fused) blocked conv kernel.

    Loop nest: parallel over (image, output-channel tile, output row) -> output-column
    tile -> input-channel blocks -> kh -> kw -> the ``c`` input channels (unrolled) ->
    channel tile (unrolled) -> column tile (unrolled) -> ``c`` output channels (vector).
    Rows are innermost in the parallel loop so that one thread's consecutive
    iterations reuse the channel tile's weights from cache (deep layers with small
    maps are otherwise bound by weight traffic). The padded input rows of one output
    row are built inside the parallel loop.
    """
    conv = find_block(sch, CONV_BLOCK)
    pad = find_block(sch, PAD_BLOCK)
    n, oc, oh, ow, ob, ic, kh, kw, ib = sch.get_loops(conv)
    _, out_chunks, out_h, out_w, block, in_chunks, kh_size, kw_size, in_block = \
        loop_extents(sch, conv)
    c_tile, w_tile = choose_register_tile(out_chunks, out_w, cfg.vector_registers,
                                          cfg.max_channel_tile, cfg.max_width_tile,
                                          cfg.max_accumulators(block))
    out = fuse_epilogue(sch, conv, producers=[pad] if pad is not None else [])
    oc_o, oc_i = sch.split(oc, [None, c_tile])
    ow_o, ow_i = sch.split(ow, [None, w_tile])
    sch.reorder(n, oc_o, oh, ow_o, ic, kh, kw, ib, oc_i, ow_i, ob)
    outer = sch.fuse(n, oc_o, oh)
    _finish_tile(sch, out, ow_o, depth=2)
    _place_pad(sch, pad, outer)
    flops = 2 * out_chunks * out_h * out_w * block * in_chunks * kh_size * kw_size * in_block
    if flops >= cfg.parallel_min_flops:
        sch.parallel(outer)
    if cfg.unroll_reduction:
        sch.unroll(ib)
    sch.unroll(oc_i)
    sch.unroll(ow_i)
    sch.vectorize(ob)
    sch.decompose_reduction(conv, ic)


def schedule_depthwise_conv2d_nchwc(sch, cfg: CpuScheduleConfig) -> None:
    """Depthwise: parallel over (image, channel block, output row) -> column tile ->
    kh -> kw -> columns (unrolled) -> the ``c`` channels (vector)."""
    conv = find_block(sch, DEPTHWISE_BLOCK)
    pad = find_block(sch, PAD_BLOCK)
    n, c, oh, ow, b, kh, kw = sch.get_loops(conv)
    _, chunks, out_h, out_w, block, kh_size, kw_size = loop_extents(sch, conv)
    _, w_tile = choose_register_tile(1, out_w, cfg.vector_registers, 1,
                                     2 * cfg.max_width_tile, cfg.max_accumulators(block))
    out = fuse_epilogue(sch, conv, producers=[pad] if pad is not None else [])
    ow_o, ow_i = sch.split(ow, [None, w_tile])
    sch.reorder(n, c, oh, ow_o, kh, kw, ow_i, b)
    outer = sch.fuse(n, c, oh)
    _finish_tile(sch, out, ow_o, depth=2)
    _place_pad(sch, pad, outer)
    if 2 * chunks * out_h * out_w * block * kh_size * kw_size >= cfg.parallel_min_flops:
        sch.parallel(outer)
    sch.unroll(kw)
    sch.unroll(ow_i)
    sch.vectorize(b)
    sch.decompose_reduction(conv, kh)
