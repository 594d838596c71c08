"""Unaligned-block (UBP) convolutions, output-stationary: a ring of accumulator rows.

Lee & Shin, "Unaligned Block Pruning", 2024: a kept block is ``GR`` consecutive filters
(rows) of one input column, starting at any row. Their kernel sorts the blocks by start
row and keeps a register tile of output rows resident while it walks down the rows.
This is that kernel. Its register tile is ``GR`` filter rows of a few pixel vectors (the
shape of :func:`.sparse_csr.tiled_rows_conv2d`'s, in at most half the registers:
:func:`choose_ring_tile`), used as a ring: at filter row ``m`` every
block starting there adds its ``GR`` weights times its input vectors to slots ``m ..
m + GR - 1`` (mod ``GR``); no later block reaches row ``m``, so its slot is complete,
leaves for the output and starts row ``m + GR``. Each block is one tap of ``GR``
broadcasts and ``GR`` FMAs a pixel vector, wherever it starts, which is what an
aligned block costs in a tile of ``GR`` rows. Tiles of fixed rows instead store a
straddling block in both tiles it crosses: 1x1 96->576 @14 in 4 x 1 blocks at 3x stores
7393 taps in tiles of 4 against 4608 blocks; the tiles took 0.176 ms, the ring 0.121 and
aligned blocks 0.118 (Zen3, 1 thread, 10th percentiles of 40 interleaved rounds).

Sketch for ``GR = 2``, rows 0-5, blocks at rows (0, 1), (1, 2) and (3, 4)::

    row 0: +(0,1) -> slots 0,1    slot 0 done: row 0 out, slot 0 <- row 2
    row 1: +(1,2) -> slots 1,0    slot 1 done: row 1 out, slot 1 <- row 3
    row 2:                        slot 0 done: row 2 out, slot 0 <- row 4
    row 3: +(3,4) -> slots 1,0    ...

The ring's slot of a row is its index mod ``GR``: the row loop is unrolled by a group
of rows (:func:`ring_group`: one ring turn where ``GR`` divides the output's channel
block, else ``lcm(GR, block)``) so every slot is a constant and the ring stays in
registers, and a finished group goes to the output, with the fused epilogue, in one
stage (:data:`RING_OUT_BLOCK`).

TE has no loop-carried state, so the kernel is written as TIR (TVMScript), its padding
copy too (:func:`.sparse_csr.transposed_flat_input`: :func:`.sparse_csr.flat_input`'s
planes, transposed in registers).

Where the time goes at high rates (1x1 96->576 @14 in 4 x 1 blocks at 10x, the 3 x 8
tiles a full register file allows, Zen3, 1 thread, 10th percentiles of 30 interleaved
rounds): 0.056 ms in all; 0.028 with every row's block count 0; 0.0077 without the
output stage as well, 0.0016 without the padding copy too. So the blocks' FMAs take
half, the output stage (the finished rows turned into ``NCHW{ob}c``, each pixel's
channels from ``GR`` rows, and the 450 KB written) 0.021, the padding copy (blocked
channels to planes) 0.006 and the row loops little. (The copy, since transposed in
registers, takes half that.) The gathered kernel on aligned
SIMD-wide blocks needs neither layout change (filters are its vector lanes): 0.014 ms of
its 0.039-0.057 are fixed costs, which is why it leads at 10x. Written as TIR shuffles,
the transposition ran slower than LLVM's own lowering of the gather (one shuffle of the
4 rows: 0.062 ms; a two-stage unpack network: 0.092): the ring held 12 of AVX2's 16
registers across the output stage, so the shuffles spilled. With
:func:`choose_ring_tile`'s tiles, which leave half of them free, the one-shuffle stage
still ran no faster (0.0541 against 0.0532 ms). An output stage every 8-32 rows, its
stage in memory and each pixel's whole channel block written at once, ran 4-8% slower
than one every ring turn.

Format (:func:`pack_ring`): ``values [blocks, GR]``, blocks ordered by start row;
``starts [rows + 1]``: row ``m``'s blocks are ``starts[m] .. starts[m + 1] - 1``;
``columns [blocks]``: each block's column of the ``[F, C * kh * kw]`` weight (its input
channel and kernel position), which the conv turns into input offsets.
"""

import math
from dataclasses import dataclass

import numpy as np

from tir_schedules.common import PARALLEL_ATTR, find_block, loop_extents
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.sparse_csr import (PIXEL_PAD_BLOCK, PixelGrid, RowTile, choose_row_tile,
                                      row_tile_layout, transposed_flat_input)

RING_ROWS_BLOCK = "npas_ring_rows"  # one filter row's blocks into the ring (opaque)
RING_INIT_BLOCK = "npas_ring_init"
RING_OUT_BLOCK = "npas_ring_out"  # a group of finished rows to the blocked output


@dataclass(frozen=True)
class RingBlocks:
    """A UBP-pruned ``[F, K]`` weight as blocks sorted by start row (module docstring)."""

    values: np.ndarray   # float32 [blocks, rows]
    columns: np.ndarray  # int32 [blocks]
    starts: np.ndarray   # int32 [filters + 1]
    in_features: int

    @property
    def rows(self) -> int:
        return int(self.values.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.starts.shape[0]) - 1

    def blocks(self) -> int:
        return int(self.starts[-1])

    def unpack(self) -> np.ndarray:
        """The dense ``[F, K]`` weight back."""
        dense = np.zeros((self.out_features + self.rows, self.in_features), np.float32)
        for row in range(self.out_features):
            for block in range(int(self.starts[row]), int(self.starts[row + 1])):
                dense[row:row + self.rows, int(self.columns[block])] += self.values[block]
        return dense[:self.out_features]


def pack_ring(weight: np.ndarray, rows: int) -> RingBlocks:
    """Pack a UBP-pruned ``[F, K]`` weight (any mask: its nonzeros are covered by blocks
    of ``rows`` rows, :func:`.sparse_unaligned.cover_blocks`), sorted by start row."""
    from tir_schedules.sparse_unaligned import cover_blocks

    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight of shape {weight.shape}: a [F, K] weight expected")
    filters, in_features = weight.shape
    if filters < rows:
        raise ValueError(f"{filters} filters are fewer than a block's {rows} rows")
    blocks = sorted(cover_blocks(weight, rows), key=lambda block: (block[1], block[0]))
    values = np.zeros((max(1, len(blocks)), rows), np.float32)
    columns = np.zeros(max(1, len(blocks)), np.int32)
    per_row = np.zeros(filters + 1, np.int64)
    taken = np.zeros(weight.shape, bool)  # a block moved up to end by the last row
    for index, (column, start) in enumerate(blocks):
        window = slice(start, start + rows)
        values[index] = np.where(taken[window, column], 0.0, weight[window, column])
        taken[window, column] = True
        columns[index] = column
        per_row[start + 1] += 1
    return RingBlocks(values, columns, np.cumsum(per_row).astype(np.int32), in_features)


def choose_ring_tile(out_h: int, out_w: int, rows: int, lanes: int,
                     registers: int) -> RowTile | None:
    """The ring's register tile: :func:`.sparse_csr.choose_row_tile`'s, its accumulators
    at most half the ``registers``. The ring stays in registers while the output stage
    gathers each pixel's channels from the finished rows, so it needs room beside the
    ring; and narrower tiles pad a small map less. Tiles of 2 pixel vectors against the
    3 a full register file allows (AVX2, 4 x 1 blocks, Zen3, 1 thread, 10th percentiles
    of 30 interleaved rounds): 1x1 96->576 @14 (1 x 16 against 3 x 8) 0.108/0.114 ms at
    3x, 0.052/0.056 at 10x; 320->1280 @7 (2 x 8 against 3 x 8) 0.204/0.221 at 3x,
    0.073/0.088 at 10x."""
    return choose_row_tile(out_h, out_w, rows, lanes, registers,
                           max_accumulators=registers // 2)


def ring_group(rows: int, out_block: int) -> int:
    """Filter rows per unrolled group: a whole number of ring turns and of the output's
    channel blocks or a whole fraction of one, so every slot and every written lane is
    a constant. One ring turn where it divides the channel block: the finished rows of
    a group wait in registers for the output stage, and two turns of 4 x 1 blocks (8
    rows) spilled them (1x1 96->576 @14 at 10x, Zen3: 0.13 ms against 0.061)."""
    return rows if out_block % rows == 0 else math.lcm(rows, out_block)


def ring_offsets(ring: RingBlocks, grid: PixelGrid) -> np.ndarray:
    """int32 ``[blocks]``: each block's input offset in one flat image (``grid``)."""
    kh, kw = grid.kernel
    channel, position = np.divmod(ring.columns.astype(np.int64), kh * kw)
    y, x = np.divmod(position, kw)
    offsets = np.asarray(grid.tap_offset(channel, y, x), np.int64)
    if offsets.size and offsets.max() >= 2**31:
        raise ValueError(f"input offsets up to {offsets.max()} do not fit int32")
    return offsets.astype(np.int32)


def ring_conv2d(data_shape, blocks: int, rows: int, strides, padding, dilation,
                out_channels: int, kernel_size, tile: RowTile, out_block: int):
    """The ring kernel as a PrimFunc ``(data [N, C/ib, H, W, ib], values [blocks, rows],
    offsets [blocks], starts [F' + 1]) -> [N, F/out_block, OH, OW, out_block]``, with
    ``F'`` the filters padded to whole groups (:func:`ring_group`; ``starts`` repeats
    its last entry there) and ``offsets`` from :func:`ring_offsets` on the grid
    :func:`.sparse_csr.row_tile_layout` gives. ``tile`` is the register tile of ``rows``
    filters (:func:`choose_ring_tile`)."""
    from tvm.script import tirx as T

    n = int(data_shape[0])
    if out_channels % out_block:
        raise ValueError(f"{out_channels} output channels are not a multiple of the "
                         f"output block {out_block}")
    grid, (out_h, out_w), reach = row_tile_layout(data_shape, kernel_size, strides, padding,
                                                  dilation, tile)
    padded_h, padded_w = tile.padded
    group = ring_group(rows, out_block)
    groups = -(-out_channels // group)
    (sh, sw), pitch = grid.strides, grid.padded[1]
    extent = -(-reach // grid.plane) * grid.plane  # whole planes, as flat_input's
    height, width, quantum = tile.height, tile.width, tile.quantum
    vectors, row_step = width // quantum, sh * pitch
    tiles_h, tiles_w = padded_h // height, padded_w // width
    chunks = out_channels // out_block
    copy = transposed_flat_input(data_shape, grid, extent)
    i64 = T.int64
    data_dims = tuple(i64(v) for v in data_shape)
    out_dims = (i64(n), i64(chunks), i64(out_h), i64(out_w), i64(out_block))

    @T.prim_func(s_tir=True)
    def ring(data: T.Buffer(data_dims, "float32"),
             values: T.Buffer((i64(blocks), i64(rows)), "float32"),
             offsets: T.Buffer((i64(blocks),), "int32"),
             starts: T.Buffer((i64(groups * group + 1),), "int32"),
             conv: T.Buffer(out_dims, "float32")):
        # the root block's buffers: the planner places each at the loop of its uses, so
        # every parallel tile owns its ring (T.alloc_buffer would stay at the top, shared)
        flat = T.sblock_alloc_buffer((i64(n), i64(extent)), "float32")
        acc = T.sblock_alloc_buffer((i64(rows), i64(height), i64(width)), "float32",
                                    scope="local")
        stage = T.sblock_alloc_buffer((i64(group), i64(height), i64(width)), "float32",
                                      scope="local")
        copy(data, flat)
        for b, ty, tx in T.grid(i64(n), i64(tiles_h), i64(tiles_w)):
            for i, y, x in T.grid(i64(rows), i64(height), i64(width)):
                with T.sblock(RING_INIT_BLOCK):
                    vi, vy, vx = T.axis.remap("SSS", [i, y, x])
                    acc[vi, vy, vx] = T.float32(0)
            for g in range(i64(groups)):
                for s in T.unroll(i64(group)):
                    with T.sblock(RING_ROWS_BLOCK):
                        vb, vty, vtx = T.axis.remap("SSS", [b, ty, tx])
                        vg = T.axis.opaque(groups, g)
                        vs = T.axis.opaque(group, s)
                        T.reads(flat[vb, 0:extent], values[0:blocks, 0:rows],
                                offsets[0:blocks], starts[vg * group + vs:vg * group + vs + 2],
                                acc[0:rows, 0:height, 0:width])
                        T.writes(acc[0:rows, 0:height, 0:width], stage[vs, 0:height, 0:width])
                        for t in range(starts[vg * group + vs], starts[vg * group + vs + 1]):
                            for k in T.unroll(rows):
                                for y in T.unroll(height):
                                    for xv in T.unroll(vectors):
                                        for xl in T.vectorized(quantum):
                                            acc[(vs + k) % rows, y, xv * quantum + xl] = (
                                                acc[(vs + k) % rows, y, xv * quantum + xl]
                                                + values[t, k] * flat[
                                                    vb, offsets[t] + (vty * height + y) * row_step
                                                    + (vtx * width + xv * quantum + xl) * sw])
                        for y in T.unroll(height):
                            for xv in T.unroll(vectors):
                                for xl in T.vectorized(quantum):
                                    stage[vs, y, xv * quantum + xl] = acc[
                                        vs % rows, y, xv * quantum + xl]
                                    acc[vs % rows, y, xv * quantum + xl] = T.float32(0)
                for c, y, x in T.grid(i64(group), i64(height), i64(width)):
                    with T.sblock(RING_OUT_BLOCK):
                        T.where(g * group + c < out_channels and ty * height + y < out_h
                                and tx * width + x < out_w)
                        vb = T.axis.spatial(n, b)
                        vco = T.axis.spatial(chunks, (g * group + c) // out_block)
                        voh = T.axis.spatial(out_h, ty * height + y)
                        vow = T.axis.spatial(out_w, tx * width + x)
                        vci = T.axis.spatial(out_block, (g * group + c) % out_block)
                        conv[vb, vco, voh, vow, vci] = stage[(vco * out_block + vci) % group,
                                                             voh % height, vow % width]

    return ring.with_attr("op_pattern", 4)  # kOutEWiseFusable: FuseOps adds the epilogue


def padded_starts(ring: RingBlocks, out_block: int) -> np.ndarray:
    """``ring.starts`` over the filters padded to whole groups (:func:`ring_group`)."""
    group = ring_group(ring.rows, out_block)
    padded = -(-ring.out_features // group) * group
    return np.concatenate([ring.starts, np.full(padded - ring.out_features,
                                                ring.starts[-1], np.int32)])


# --- schedule ---------------------------------------------------------------------------


def schedule_ring_conv2d(sch, cfg: CpuScheduleConfig) -> None:
    """The fused epilogue inlined into the output stage (every stage but the last into
    its consumers, as for the other pixel kernels, then the last into the output
    stage), which writes each pixel's channel vector (the group's finished rows,
    transposed in registers); the padding copy and the tiles parallel when big. The
    copy's and the ring's own loops are unrolled and vectorized in their TIR."""
    from tir_schedules.sparse_csr import inline_epilogue_into

    out = find_block(sch, RING_OUT_BLOCK)
    inline_epilogue_into(sch, out)
    b, ty, tx, g, c, y, x = sch.get_loops(out)
    _, tiles_h, tiles_w, _, group, height, width = loop_extents(sch, out)
    n, blocks_stored, rows = _ring_extents(sch)
    work = 2 * n * blocks_stored * rows * tiles_h * height * tiles_w * width
    if work >= cfg.parallel_min_flops:
        copy = find_block(sch, PIXEL_PAD_BLOCK)
        sch.parallel(sch.fuse(*sch.get_loops(copy)))
    out_block = int(sch.get(out).iter_vars[-1].dom.extent)
    c_outer, c_inner = sch.split(c, [None, min(group, out_block)])  # one channel block
    sch.reorder(c_outer, y, x, c_inner)
    for loop in (y, x):
        sch.unroll(loop)
    sch.vectorize(c_inner)
    outer = sch.fuse(b, ty, tx)
    if work >= cfg.parallel_min_flops:  # sch.parallel refuses the ring's opaque blocks
        sch.annotate(outer, PARALLEL_ATTR, 1)


def _ring_extents(sch) -> tuple[int, int, int]:
    """(images, stored blocks, ring rows) of the ring kernel in ``sch``."""
    flat, values = (region.source for region in  # its reads, as ring_conv2d lists them
                    sch.get(find_block(sch, RING_ROWS_BLOCK)).reads[:2])
    return int(flat.shape[0]), int(values.shape[0]), int(values.shape[1])
