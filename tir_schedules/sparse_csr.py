"""Row-sparse convolutions vectorized along output pixels: unstructured (CSR) and UBP.

Unstructured pruning (Han et al., NeurIPS'15) is the baseline the structured schemes of
NPAS (Li et al., CVPR'21) must beat; unaligned block pruning (Lee & Shin, "Unaligned
Block Pruning", 2024) keeps GR x 1 blocks at any row offset. Neither gives a block of
filters a shared set of taps, so the filter-vectorized gathered kernel
(:mod:`.sparse_conv`) would compute the union of the filters' taps. This kernel
vectorizes along output pixels instead, as XNNPACK's sparse 1x1 kernels do (Elsen et
al., "Fast Sparse ConvNets", CVPR'20): per kept weight one broadcast and one vector of
input pixels per vector of outputs, with no wasted lane whatever the mask.

Format: the gathered one (:func:`.sparse_conv.pack_gathered`) with tiles of ``R``
output rows: per tile its kept taps (union over the tile's rows) and ``[taps, R]``
weights, tap loops bounded by each tile's count (:func:`.sparse_conv.bound_tap_loops`).
``R = 1`` is CSR (one row's nonzeros, nothing padded); for UBP a larger ``R`` loads
each input vector once for ``R`` rows at the price of the zeros of blocks straddling
two tiles; :func:`choose_rows` picks ``R`` per layer from that trade-off.

Pixels. The input is copied once per call, zero-padded, into a channel-major flat
buffer (``[N, C * Hp * Wp + slack]``). With stride 1 an output pixel ``q = oh * Wp +
ow`` on the padded grid reads ``base + q``: consecutive outputs read consecutive
inputs, so a tile of ``T`` pixels is ``T / lanes`` plain vector loads per tap (the
``Wp - OW`` columns past each row are computed and dropped; ``slack`` keeps the last
tile's reads in bounds). Other strides index ``(q // OW, q % OW)`` (gathers). The
accumulated ``[N, rows, Q]`` is written to the ``NCHW{c}c`` output by a last stage
(where the fused epilogue runs), so neighbours keep their blocked layout.

Register tiles (:func:`tiled_rows_conv2d`, ``R >= 2``: UBP, and aligned blocks shorter
than the vector). A tile is ``R`` filters by a few output rows of whole pixel vectors
(:func:`choose_row_tile`), the output padded to whole tiles; the output stage runs at
the tile and reads its accumulators from registers, ``R`` filters' pixel vectors
transposed by shuffles into the pixels' channel vectors of the blocked layout. The
flat form's ``[N, rows, Q]`` buffer and copy cost as much as the kernel at high rates
(1x1 96->576 @14, UBP 4 x 1 at 10x: 0.140 ms against 0.072 on Zen3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tir_schedules.common import find_block, largest_divisor, loop_extents
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.sparse_conv import SPARSE_CONV_BLOCK, TAP_AXIS

ROWS_CONV_BLOCK = SPARSE_CONV_BLOCK + "_rows"  # the prefix lets bound_tap_loops find it
PIXEL_PAD_BLOCK = "npas_pixel_pad"
ROWS_OFFSET_BLOCK = "npas_rows_offsets"
OUTPUT_RUN = 8  # output pixels per unrolled run of the blocked output's copy
PIXEL_OUT_BLOCK = "npas_pixel_out"
TILE_ATTR = "npas_pixel_tile"
ROW_TILE_ATTR = "npas_row_tile"  # tiled_rows_conv2d's (quantum, height, width)
PIXEL_QUANTUM = 16  # output pixels are padded to multiples of the tile, itself of this


@dataclass(frozen=True)
class PixelGrid:
    """Where output pixel ``q`` of the flat ``[Q]`` output grid reads its input."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    tile: int
    plane_quantum: int = 1  # channel planes start at multiples of this (aligned loads)

    @property
    def padded(self) -> tuple[int, int]:
        top, left, bottom, right = self.padding
        return self.height + top + bottom, self.width + left + right

    @property
    def out_size(self) -> tuple[int, int]:
        (hp, wp), (kh, kw) = self.padded, self.kernel
        (sh, sw), (dh, dw) = self.strides, self.dilation
        return (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1

    @property
    def unit_stride(self) -> bool:
        return tuple(self.strides) == (1, 1)

    @property
    def row_pitch(self) -> int:
        """Output pixels per output row on the flat grid (``Wp`` with stride 1)."""
        return self.padded[1] if self.unit_stride else self.out_size[1]

    @property
    def pixels(self) -> int:
        return -(-self.out_size[0] * self.row_pitch // self.tile) * self.tile

    @property
    def plane_rows(self) -> int:
        """Rows per channel plane: the padded map's, plus zero rows until the plane is a
        multiple of ``plane_quantum`` (planes start aligned; rows stay whole)."""
        hp, wp = self.padded
        rows = hp
        while (rows * wp) % self.plane_quantum:
            rows += 1
        return rows

    @property
    def plane(self) -> int:
        """Flat elements per channel."""
        return self.plane_rows * self.padded[1]

    def with_row_quantum(self, quantum: int) -> "PixelGrid":
        """This grid with zero columns on the right until a padded row is a multiple of
        ``quantum`` elements: with stride 1 a row of output vectors then reads whole
        aligned input vectors (where the tap's column is 0), not ones straddling cache
        lines. The output size grows by those columns; callers keep the original's."""
        top, left, bottom, right = self.padding
        return dataclasses.replace(self, padding=(top, left, bottom,
                                                  right + -self.padded[1] % quantum))

    def tap_offset(self, channel, y, x):
        """Element offset of tap (channel, kh, kw) in one padded image (ints or exprs)."""
        return channel * self.plane + y * (self.dilation[0] * self.padded[1]) \
            + x * self.dilation[1]

    def tiled_offset(self, channel, x):
        """Element offset of position ``x`` of ``channel``'s padded plane in one image
        of :func:`tiled_flat_input` (ints or exprs)."""
        return x // self.tile * (self.channels * self.tile) + channel * self.tile + x % self.tile

    def pixel_offset(self, q):
        if self.unit_stride:
            return q
        ow = self.out_size[1]
        return q // ow * (self.strides[0] * self.padded[1]) + q % ow * self.strides[1]

    @property
    def extent(self) -> int:
        """Flat input elements per image, with the slack the last tile may read."""
        kh, kw = self.kernel
        last = self.pixels - 1
        if self.unit_stride:
            reach = last
        else:
            ow = self.out_size[1]
            reach = last // ow * self.strides[0] * self.padded[1] + (ow - 1) * self.strides[1]
        top = self.tap_offset(self.channels - 1, kh - 1, kw - 1) + reach + 1
        return max(-(-top // self.plane), self.channels) * self.plane  # whole planes


def choose_pixel_tile(out_h: int, row_pitch: int, rows: int, lanes: int,
                      registers: int, max_local_bytes: int = 1024) -> int:
    """Output pixels per register tile, a multiple of :data:`PIXEL_QUANTUM`: the
    ``rows x tile / lanes`` accumulators plus a broadcast and an input vector fit the
    registers; among those, the least padded work, a per-tile overhead counted."""
    pixels = out_h * row_pitch
    best, best_cost = PIXEL_QUANTUM, math.inf
    for tile in range(PIXEL_QUANTUM, 8 * PIXEL_QUANTUM + 1, PIXEL_QUANTUM):
        if tile > PIXEL_QUANTUM and (rows * (tile // lanes) + 2 > registers
                                     or rows * tile * 4 > max_local_bytes):
            break
        cost = -(-pixels // tile) * tile * (1 + PIXEL_QUANTUM / tile)
        if cost < best_cost - 1e-9:
            best, best_cost = tile, cost
    return best


def pixel_grid(data_shape: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], tile: int,
               plane_quantum: int = 1) -> PixelGrid:
    """The grid of an ``NCHW{ib}c`` input ``[N, C/ib, H, W, ib]``."""
    _, chunks, height, width, block = (int(v) for v in data_shape)
    return PixelGrid(chunks * block, height, width, tuple(int(k) for k in kernel_size),
                     tuple(int(s) for s in strides), tuple(int(p) for p in padding),
                     tuple(int(d) for d in dilation), int(tile), int(plane_quantum))


def flat_input_value(data, grid: PixelGrid, b, e):
    """Element ``e`` of image ``b``'s flat input (:func:`flat_input`) from ``data`` (a TE
    tensor or a TIR buffer, ``[N, C/ib, H, W, ib]``)."""
    from tvm import te

    _, _, height, width, block = (int(v) for v in data.shape)
    wp = grid.padded[1]
    top, left = grid.padding[0], grid.padding[1]
    within = e % grid.plane
    channel, y, x = e // grid.plane, within // wp - top, within % wp - left
    inside = te.all(channel < grid.channels, y >= 0, y < height, x >= 0, x < width)
    return te.if_then_else(inside, data[b, te.min(channel, grid.channels - 1) // block,
                                        y, x, channel % block], 0.0)


def flat_input_attrs(grid: PixelGrid, in_block: int) -> dict:
    """The padding copy's annotations, which its schedule reads."""
    return {"npas_row": grid.padded[1], "npas_plane_rows": grid.plane_rows,
            "npas_in_block": in_block, "npas_top_left": list(grid.padding[:2])}


def flat_input(data, grid: PixelGrid, extent: int | None = None):
    """``[N, extent]``: the zero-padded input, channel-major, one plane per channel
    (whole planes, so the schedule splits the flat axis into channel, row, column)."""
    from tvm import te

    extent = grid.extent if extent is None else -(-extent // grid.plane) * grid.plane
    return te.compute((int(data.shape[0]), extent),
                      lambda b, e: flat_input_value(data, grid, b, e), name=PIXEL_PAD_BLOCK,
                      attrs=flat_input_attrs(grid, int(data.shape[4])))


def transposed_flat_input(data_shape: Sequence[int], grid: PixelGrid, extent: int):
    """:func:`flat_input` (``extent`` whole planes) for a kernel written in TIR: a
    TVMScript macro ``copy(data, flat)``, one :data:`PIXEL_PAD_BLOCK` per image, channel
    block, plane row and run of ``P`` positions (``P``: the largest divisor of the
    padded row up to the channel block ``ib``). The run's ``P`` pixel vectors go to a
    local ``P x ib`` and out as ``ib`` plane runs, so LLVM transposes them in
    registers, as :func:`_transpose_padding_copy` has TE's copy do. In the UBP ring on
    1x1 96->576 @14 (8 x 1 at 10x, Zen3, 1 thread, 10th percentiles of 30 interleaved
    rounds) the copy and the ring's loops took 0.0044 ms this way, 0.0077 per element
    and 0.0080 as TE's copy is scheduled (its ``cache_read`` tile did not stay in
    registers there)."""
    from tvm.script import tirx as T

    n, chunks, height, width, block = (int(v) for v in data_shape)
    rows, pitch, plane = grid.plane_rows, grid.padded[1], grid.plane
    if extent % plane:
        raise ValueError(f"a flat extent of {extent} is not whole planes of {plane}")
    planes = extent // plane
    run = largest_divisor(pitch, block)
    top, left = grid.padding[0], grid.padding[1]
    i64 = T.int64

    @T.macro
    def copy(data, flat):
        for b, chunk, y, xo in T.grid(i64(n), i64(-(-planes // block)), i64(rows),
                                      i64(pitch // run)):
            with T.sblock(PIXEL_PAD_BLOCK):
                vb, vc, vy, vxo = T.axis.remap("SSSS", [b, chunk, y, xo])
                T.reads(data[vb, 0:chunks, 0:height, 0:width, 0:block])
                T.writes(flat[vb, vc * block * plane:(vc + 1) * block * plane])
                pixels = T.alloc_buffer((run, block), "float32", scope="local")
                for i in T.unroll(run):
                    for lane in T.vectorized(block):
                        x = vxo * run + i
                        pixels[i, lane] = T.if_then_else(
                            vc < chunks and top <= vy and vy < top + height
                            and left <= x and x < left + width,
                            data[vb, T.min(vc, chunks - 1), T.max(T.min(vy - top, height - 1), 0),
                                 T.max(T.min(x - left, width - 1), 0), lane],
                            T.float32(0))
                for lane in T.unroll(block):
                    if vc * block + lane < planes:
                        for i in T.vectorized(run):
                            flat[vb, (vc * block + lane) * plane + vy * pitch + vxo * run + i] = (
                                pixels[i, lane])

    return copy


def tiled_flat_input(data, grid: PixelGrid, positions: int):
    """``[N, tiles * C * tile]``: the zero-padded input in pixel tiles, each tile holding
    every channel's ``grid.tile`` positions in a row (position ``x`` of channel ``c`` at
    ``grid.tiled_offset(c, x)``), for ``positions`` positions of the padded plane (a
    multiple of the tile).

    A kernel that walks pixel tiles outermost and reads each tile of many channels
    reads one contiguous block instead of one run per channel plane: one stream the
    hardware prefetcher follows, where channel planes are as many streams as channels."""
    from tvm import te, tirx

    n, _, height, width, block = (int(v) for v in data.shape)
    _, wp = grid.padded
    top, left = grid.padding[0], grid.padding[1]
    tile, channels = grid.tile, grid.channels
    if positions % tile:
        raise ValueError(f"{positions} positions are not whole tiles of {tile}")

    def body(b, e):
        x = e // (channels * tile) * tile + e % tile
        channel = e // tile % channels
        y, col = x // wp - top, x % wp - left
        inside = te.all(y >= 0, y < height, col >= 0, col < width)
        value = data[b, channel // block, te.max(te.min(y, height - 1), 0),
                     te.max(te.min(col, width - 1), 0), channel % block]
        return tirx.Select(inside, value, tirx.const(0.0, "float32"))

    return te.compute((n, positions * channels), body, name=PIXEL_PAD_BLOCK,
                      attrs={"npas_tile": tile, "npas_in_block": block,
                             "npas_channels": channels})


def blocked_output(acc_at, n: int, grid: PixelGrid | None, out_channels: int, out_block: int,
                   out_grid: tuple[int, int, int] | None = None):
    """``NCHW{out_block}c`` output from ``acc_at(b, channel, q)`` (the kernel's flat
    accumulators, output pixel ``(oh, ow)`` at ``q = oh * pitch + ow``: ``grid``'s row
    pitch, or ``out_grid = (out_h, out_w, pitch)``); fused epilogues run in this stage."""
    from tvm import te

    if out_channels % out_block:
        raise ValueError(f"{out_channels} output channels are not a multiple of the "
                         f"output block {out_block}")
    out_h, out_w, pitch = out_grid or (*grid.out_size, grid.row_pitch)
    return te.compute((n, out_channels // out_block, out_h, out_w, out_block),
                      lambda b, co, oh, ow, ci: acc_at(b, co * out_block + ci, oh * pitch + ow),
                      name=PIXEL_OUT_BLOCK)


# Per stored tap, in FMAs of one pixel vector: its input vector's load and its index,
# weights and loop (a fit, not a cost of one instruction: with pixel tiles outermost the
# input tile is in L1). Fitted to UBP 4 x 1 on 1x1 96->576 @14 (Zen3, 1 thread) over
# tiles of 1, 2 and 4 rows with 2 to 14 pixel vectors.
ROWS_LOAD_COST = 6.0  # per tap and pixel vector
ROWS_TAP_COST = 9.0  # per tap and tile, plus one per row (its broadcast)


@dataclass(frozen=True)
class RowTile:
    """The row-sparse kernel's register tile: ``height`` output rows by ``width``
    columns of one tile of ``R`` filters, columns in vectors of ``quantum`` lanes. The
    accumulators cover the output padded to ``padded`` (rows, columns), whole tiles."""

    quantum: int
    height: int
    width: int
    padded: tuple[int, int]

    @property
    def vectors(self) -> int:
        """Pixel vectors per filter row of the tile."""
        return self.height * self.width // self.quantum

    def computed_vectors(self) -> int:
        """Pixel vectors per filter row over the padded output."""
        return self.padded[0] * self.padded[1] // self.quantum


ROW_WASTE = 1.15  # a row padded to whole vectors computes at most this much more


def row_quantum(out_w: int, lanes: int) -> int:
    """Pixel vector width for rows of ``out_w`` columns: the widest of ``lanes``,
    ``lanes / 2``, ... (at least 4) whose padding wastes at most :data:`ROW_WASTE`
    (a 7-wide map on 16 lanes takes 8), else the narrowest."""
    quantum = lanes
    while quantum > 4 and -(-out_w // quantum) * quantum > ROW_WASTE * out_w:
        quantum //= 2
    return quantum


def tap_cost(rows: int, vectors: int) -> float:
    """Estimated time of one stored tap per pixel vector, in FMAs of a pixel vector, in
    tiles of ``rows`` filters and ``vectors`` pixel vectors (:data:`ROWS_LOAD_COST`,
    :data:`ROWS_TAP_COST`)."""
    return ROWS_LOAD_COST + rows + (ROWS_TAP_COST + rows) / vectors


def row_tile_cost(tile: RowTile, rows: int) -> float:
    """Estimated time of one stored tap over the whole output (:func:`tap_cost`)."""
    return tile.computed_vectors() * tap_cost(rows, tile.vectors)


def choose_row_tile(out_h: int, out_w: int, rows: int, lanes: int, registers: int,
                    max_accumulators: int | None = None) -> RowTile | None:
    """The register tile of :func:`tiled_rows_conv2d` for ``rows`` filter rows with the least
    estimated time (:func:`row_tile_cost`: more pixel vectors per tap, less padding)
    whose ``rows x vectors`` accumulators, plus the broadcasts or input vectors of a
    tap (the fewer) and one more, fit the ``registers`` (and the accumulators
    ``max_accumulators``, where given); None if none does. The output is padded to
    whole tiles: the kernel computes the padding (a guard in the tap loop would cost
    more) and the write-back skips it."""
    quantum = row_quantum(out_w, lanes)
    row = -(-out_w // quantum) * quantum
    best, best_cost = None, math.inf
    for height in range(1, out_h + 1):
        for width in range(quantum, row + 1, quantum):
            vectors = height * width // quantum
            if (rows * vectors + min(rows, vectors) + 1 > registers
                    or rows * vectors > (max_accumulators or registers)):
                continue
            padded = (-(-out_h // height) * height, -(-row // width) * width)
            tile = RowTile(quantum, height, width, padded)
            cost = row_tile_cost(tile, rows)
            if cost < best_cost - 1e-9:
                best, best_cost = tile, cost
    return best


def _tap_offsets(taps, grid: PixelGrid, rows: int, out_channels: int):
    """``[tiles, taps]``: each tap's element offset in one padded image (both forms),
    after checking that ``tiles`` tiles of ``rows`` hold the output channels."""
    from tvm import te

    tiles, max_taps = (int(v) for v in taps.shape[:2])
    if not (tiles - 1) * rows < out_channels <= tiles * rows:
        raise ValueError(f"{out_channels} output channels do not fit {tiles} tiles of {rows}")
    return te.compute((tiles, max_taps), lambda r, t: grid.tap_offset(
        taps[r, t, 0], taps[r, t, 1], taps[r, t, 2]), name=ROWS_OFFSET_BLOCK)


def _tap_sum(values, counts, flat, offsets, b, r, i, pixel):
    """Row ``i`` of tile ``r`` at the pixel ``pixel`` elements into each tap's input:
    the sum over the tile's taps (guarded by its count, see ``bound_tap_loops``)."""
    from tvm import te

    t = te.reduce_axis((0, int(values.shape[1])), name=TAP_AXIS)
    return te.sum(te.if_then_else(t < counts[r], values[r, t, i] * flat[b, offsets[r, t]
                                                                          + pixel], 0.0),
                  axis=t)


def rows_conv2d(data, values, taps, counts, strides: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], out_channels: int, kernel_size: Sequence[int],
                pixel_tile: int, out_block: int):
    """Row-sparse convolution, ``NCHW{ib}c`` in, ``NCHW{out_block}c`` out.

    ``values [tiles, taps, R]``, ``taps [tiles, taps, 3]`` and ``counts [tiles]`` are
    :class:`~.sparse_conv.GatheredWeights` arrays packed with ``block = R`` (any ``R``;
    the last tile may be ragged). ``pixel_tile`` (a multiple of 16) pads the flat
    output grid; the schedule's register tile is this many pixels, written to a
    ``[N, tiles, R, pixels]`` buffer that a last stage copies into the blocked output.
    This is the CSR form (``R = 1``): a tile of one filter has no channel vector to
    write, and the copy (vector stores, then one scalar move per element) beat writing
    each element from registers (:func:`tiled_rows_conv2d`) by 6-7% on 1x1 96->576 @14
    and 8-16% on 3x3 128->128 @28 (unstructured 3x / 10x, Zen3, 1 thread).
    """
    from tvm import te

    if pixel_tile % PIXEL_QUANTUM:
        raise ValueError(f"pixel_tile {pixel_tile}: a multiple of {PIXEL_QUANTUM}")
    n = int(data.shape[0])
    tiles, _, rows = (int(v) for v in values.shape)
    grid = pixel_grid(data.shape, kernel_size, strides, padding, dilation, pixel_tile)
    offsets = _tap_offsets(taps, grid, rows, out_channels)
    flat = flat_input(data, grid)
    acc = te.compute((n, tiles, rows, grid.pixels), lambda b, r, i, q: _tap_sum(
        values, counts, flat, offsets, b, r, i, grid.pixel_offset(q)),
        name=ROWS_CONV_BLOCK, attrs={TILE_ATTR: pixel_tile})
    return blocked_output(lambda b, m, q: acc[b, m // rows, m % rows, q], n, grid,
                          out_channels, out_block)


def tiled_rows_conv2d(data, values, taps, counts, strides: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], out_channels: int,
                      kernel_size: Sequence[int], tile: RowTile | Sequence[int],
                      out_block: int):
    """Row-sparse convolution in register tiles, ``NCHW{ib}c`` in, ``NCHW{out_block}c``
    out; the arrays as for :func:`rows_conv2d`. ``tile`` (a :class:`RowTile`, or its
    fields with ``padded`` flattened) is the register tile: the accumulators are ``[N,
    tiles, R, *tile.padded]`` and the output stage reads them per tile, so the schedule
    writes each tile from registers into the blocked output (:func:`schedule_rows_conv2d`).
    With stride 1 the input rows are padded to whole vectors (:meth:`PixelGrid.with_row_quantum`;
    1x1 96->576 @14 and 320->1280 @7, 4 x 1 blocks at 3x: 2-13% faster, Zen3, 1 thread).
    """
    from tvm import te

    if not isinstance(tile, RowTile):
        quantum, height, width, padded_h, padded_w = (int(v) for v in tile)
        tile = RowTile(quantum, height, width, (padded_h, padded_w))
    n = int(data.shape[0])
    tiles, _, rows = (int(v) for v in values.shape)
    if out_channels % out_block:
        raise ValueError(f"{out_channels} output channels are not a multiple of the "
                         f"output block {out_block}")
    grid, (out_h, out_w), reach = row_tile_layout(data.shape, kernel_size, strides, padding,
                                                  dilation, tile)
    offsets = _tap_offsets(taps, grid, rows, out_channels)
    padded_h, padded_w = tile.padded
    (sh, sw), pitch = grid.strides, grid.padded[1]
    flat = flat_input(data, grid, extent=reach)
    acc = te.compute((n, tiles, rows, padded_h, padded_w), lambda b, r, i, oh, x: _tap_sum(
        values, counts, flat, offsets, b, r, i, oh * (sh * pitch) + x * sw),
        name=ROWS_CONV_BLOCK, attrs={ROW_TILE_ATTR: [tile.quantum, tile.height, tile.width]})
    return te.compute((n, out_channels // out_block, out_h, out_w, out_block),
                      lambda b, co, oh, ow, ci: acc[b, (co * out_block + ci) // rows,
                                                    (co * out_block + ci) % rows, oh, ow],
                      name=PIXEL_OUT_BLOCK)


def row_tile_layout(data_shape: Sequence[int], kernel_size: Sequence[int],
                    strides: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                    tile: RowTile) -> tuple[PixelGrid, tuple[int, int], int]:
    """(the flat input's grid, the output size, the flat elements of one image that the
    tiles read) for register tiles ``tile`` over an ``NCHW{ib}c`` input of
    ``data_shape``, after checking that ``tile`` covers the output. With stride 1 the
    grid's rows are whole pixel vectors (:meth:`PixelGrid.with_row_quantum`), so a
    tile's input loads are aligned; its own output size then counts those columns."""
    grid = pixel_grid(data_shape, kernel_size, strides, padding, dilation, tile.quantum)
    out_h, out_w = grid.out_size
    if grid.unit_stride:
        grid = grid.with_row_quantum(tile.quantum)
    padded_h, padded_w = tile.padded
    if (padded_h < out_h or padded_w < out_w or padded_h % tile.height
            or padded_w % tile.width or tile.width % tile.quantum):
        raise ValueError(f"{tile} does not tile a {out_h} x {out_w} output")
    (sh, sw), pitch = grid.strides, grid.padded[1]
    kh, kw = grid.kernel
    reach = (grid.tap_offset(grid.channels - 1, kh - 1, kw - 1)
             + (padded_h - 1) * sh * pitch + (padded_w - 1) * sw + 1)
    return grid, (out_h, out_w), reach


def straddle_entries(weight: np.ndarray, rows: int) -> int:
    """Taps the packed format stores (before padding) with tiles of ``rows`` rows."""
    matrix = weight.reshape(weight.shape[0], -1) != 0
    tiles = -(-matrix.shape[0] // rows)
    padded = np.zeros((tiles * rows, matrix.shape[1]), bool)
    padded[:matrix.shape[0]] = matrix
    return int(padded.reshape(tiles, rows, -1).any(axis=1).sum())


def choose_rows(weight: np.ndarray, candidates: Sequence[int] = (1, 2, 4, 8),
                groups: int = 1, per_tap: Callable[[int], float | None] | None = None) -> int:
    """Rows per tile ``R`` minimizing the estimated time: the taps the format stores
    with ``R`` rows (a block straddling two tiles stores a tap in each) times
    ``per_tap(R)``, a tap's time (None: no register tile holds ``R`` rows; default:
    ``R`` FMAs, an input load and a quarter of the tap's index and broadcasts per
    pixel vector)."""
    filters = weight.shape[0]
    per_group = filters // max(groups, 1)
    best, best_cost = None, math.inf
    for rows in candidates:
        if groups > 1 and per_group % rows:
            continue
        tap = tap_cost(rows, 4) if per_tap is None else per_tap(rows)
        if tap is None:
            continue
        cost = straddle_entries(weight, rows) * tap
        if cost < best_cost - 1e-9:
            best, best_cost = rows, cost
    return 1 if best is None else best


# --- schedules --------------------------------------------------------------------------


def pixel_tile_of(sch, block) -> int:
    return int(sch.get(block).annotations[TILE_ATTR])


def schedule_pixel_stages(sch, main, cfg: CpuScheduleConfig, work: int) -> None:
    """The layout changes around a pixel-vectorized kernel: the padding copy first
    (parallel when big), and every stage after the kernel inlined into the last, which
    writes the blocked output (parallel over its outer loops).

    Both copies transpose between a channel block's vectors and pixel rows, and both
    walk the side that is contiguous in its vector's order with the other side's
    lanes unrolled as scalar accesses at constant offsets: the copy reads one pixel's
    ``ib`` channels and writes them to ``ib`` planes; the output reads a run of one
    channel's pixels and writes each to its pixel's block. Vectorizing along the
    strided side instead (a gather or a scatter per vector, plus the flat index's
    divisions) took twice as long: on a 3x3 128->128 conv at 28x28 (AVX-512, 1
    thread), 41 -> 22 us for the copy and 26 -> 12 us for the output, of a 0.69 ms
    pattern kernel. The output's lane loop is unrolled too: left as a loop, LLVM
    vectorizes it across the lanes (one gather per pixel) where its cost model rates
    gathers cheap, as for Zen4, whose gathers are slow (1x1 96->576 @14, CSR at 10x:
    0.096 -> 0.087 ms on a Zen4 EPYC)."""
    _schedule_padding_copy(sch, cfg, work)
    last = _inline_epilogue(sch, main)
    loops = sch.get_loops(last)
    extents = loop_extents(sch, last)
    outer = sch.fuse(*loops[:3]) if len(loops) >= 5 else loops[0]
    if len(loops) >= 5:  # (image, chunk, row) -> lane -> column runs (unrolled)
        ow, lane = loops[3], loops[4]
        run = largest_divisor(extents[3], OUTPUT_RUN)
        ow_outer, ow_inner = sch.split(ow, [None, run])
        sch.reorder(lane, ow_outer, ow_inner)
        sch.unroll(ow_inner)
        sch.unroll(lane)  # else LLVM may vectorize it into gathers (it does for znver4)
    if work >= cfg.parallel_min_flops:
        sch.parallel(outer)


def _inline_epilogue(sch, main):
    """Every stage after ``main`` inlined into the last, which is returned (None if no
    stage follows ``main``)."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(main).name_hint) + 1:]
    for block in after[:-1]:
        sch.compute_inline(block)
    return after[-1] if after else None


def inline_epilogue_into(sch, stage) -> None:
    """Every stage after ``stage`` (a hand-written kernel's output stage) inlined into
    it, so the fused epilogue is applied where the stage writes each output."""
    last = _inline_epilogue(sch, stage)
    if last is not None:
        sch.reverse_compute_inline(last)


def _schedule_padding_copy(sch, cfg: CpuScheduleConfig, work: int) -> None:
    """The padding copy (:func:`flat_input` or :func:`tiled_flat_input`), parallel when
    big. Where a plane's rows start at the input's own (no padding above or left), are
    whole runs of ``ib`` positions and the input's rows at least one run:
    :func:`_transpose_padding_copy`. Otherwise per block of ``ib`` channels, each
    pixel's vector read once and its lanes written to ``ib`` planes (or rows of a
    tile)."""
    pad = find_block(sch, PIXEL_PAD_BLOCK)
    extent = loop_extents(sch, pad)[1]
    annotations = sch.get(pad).annotations
    in_block = int(annotations["npas_in_block"])
    if "npas_tile" in annotations:  # tile -> channel block -> position -> lane
        n, e = sch.get_loops(pad)
        tile = int(annotations["npas_tile"])
        chunks = int(annotations["npas_channels"]) // in_block
        tiles, chunk, lane, x = sch.split(e, [None, chunks, in_block, tile])
        sch.reorder(tiles, chunk, x, lane)
        outer = sch.fuse(n, tiles)
        sch.unroll(lane)
    elif (in_block > 1 and tuple(int(v) for v in annotations["npas_top_left"]) == (0, 0)
          and int(annotations["npas_row"]) % in_block == 0
          and int(sch.get(pad).reads[0].source.shape[3]) >= in_block):
        outer = _transpose_padding_copy(sch, pad, in_block)
    else:  # channel block -> row -> column -> lane
        n, e = sch.get_loops(pad)
        width, rows = int(annotations["npas_row"]), int(annotations["npas_plane_rows"])
        channel, row, x = sch.split(e, [None, rows, width])  # exact: whole planes, rows
        chunk, lane = sch.split(channel, [None, in_block])
        sch.reorder(chunk, row, x, lane)
        outer = sch.fuse(n, chunk)
        sch.unroll(lane)
    if extent >= 4096 and work >= cfg.parallel_min_flops:
        sch.parallel(outer)


def _transpose_padding_copy(sch, pad, in_block: int):
    """:func:`flat_input`'s copy in tiles of ``ib`` positions by ``ib`` channels: the
    tile's ``ib`` pixel vectors read into a local buffer (``cache_read``), written out
    as ``ib`` plane runs, so LLVM transposes them in registers. The block's flat axis is
    first remapped to (plane, row, run, position) so the tile's region is exact. Per
    element (a pixel's vector, ``ib`` scalar stores) it cost 2.5x as much: 96 channels
    @14 0.0074 against 0.0029 ms alone; aligned 4 x 1 blocks (``block_rows``) on 1x1
    96->576 @14 at 10x, 0.0549 against 0.0519 ms (Zen3, 1 thread, 10th percentiles of
    30 interleaved rounds). Returns the loop to parallelize."""
    annotations = sch.get(pad).annotations
    width, rows = int(annotations["npas_row"]), int(annotations["npas_plane_rows"])
    plane = rows * width
    planes = loop_extents(sch, pad)[1] // plane
    dims = [(planes, lambda e: e // plane), (rows, lambda e: e % plane // width),
            (width // in_block, lambda e: e % width // in_block),
            (in_block, lambda e: e % in_block)]
    kept = [index for extent, index in dims if extent > 1]  # IndexMap wants no unit axis
    sch.transform_block_layout(pad, lambda b, e: [b, *(index(e) for index in kept)])
    loops = sch.get_loops(pad)
    n, position = loops[0], loops[-1]
    chunk, lane = sch.split(loops[1], [None, in_block])
    sch.reorder(chunk, *loops[2:-1], lane, position)
    tile = sch.cache_read(pad, 0, "local")
    sch.compute_at(tile, sch.get_loops(pad)[-3])
    tile_loops = sch.get_loops(tile)[-2:]
    sch.unroll(tile_loops[0])
    sch.vectorize(tile_loops[1])
    sch.unroll(lane)
    sch.vectorize(position)
    return sch.fuse(n, chunk)


def unroll_tile(sch, block, lanes: int, at=None) -> None:
    """A register tile's copy (loops under ``at``, by default its outermost loop)
    unrolled and vectorized ``lanes`` wide: one vector per accumulator register (a
    tile-wide vector makes LLVM blend every FMA's result into one long value)."""
    from tir_schedules.common import same

    loops = sch.get_loops(block)
    start = 0 if at is None else next(i for i, loop in enumerate(loops) if same(sch, loop, at))
    loops = loops[start + 1:]
    outer, inner = sch.split(loops[-1], [None, lanes])
    for loop in [*loops[:-1], outer]:
        sch.unroll(loop)
    sch.vectorize(inner)


def tile_pixels(sch, main, cfg: CpuScheduleConfig, work: int, spatial, reductions: list,
                inner: list, unrolled: list) -> None:
    """The pixel-vectorized kernels' common nest: parallel over (image, pixel tile,
    rows) (``sparse_parallel="blocks"``: rows before pixel tiles) -> ``reductions`` ->
    ``inner`` -> pixel vectors (unrolled) -> lanes (vector); accumulators in a small
    buffer at the tile (``sparse_accumulator_scope``); ``unrolled`` loops unrolled."""
    b, rows, q = spatial
    tile = pixel_tile_of(sch, main)
    vectors = max(1, tile // cfg.lanes)
    q_o, q_v, q_l = sch.split(q, [None, vectors, tile // vectors])
    order = [b, rows, q_o] if cfg.sparse_parallel == "blocks" else [b, q_o, rows]
    sch.reorder(*order, *reductions, *inner, q_v, q_l)
    outer = sch.fuse(*order)
    acc = sch.cache_write(main, 0, cfg.sparse_accumulator_scope)
    sch.reverse_compute_at(acc, outer)
    unroll_tile(sch, acc, cfg.lanes)
    if work >= cfg.parallel_min_flops:
        sch.parallel(outer)
    for loop in [*unrolled, q_v]:
        sch.unroll(loop)
    sch.vectorize(q_l)
    sch.decompose_reduction(main, reductions[0])


def schedule_rows_conv2d(sch, cfg: CpuScheduleConfig) -> None:
    """Either form of the row-sparse conv (:func:`rows_conv2d`: parallel over (image,
    pixel tile, row tile) -> taps -> rows -> pixel vectors -> lanes, accumulators in a
    small stack buffer at the tile; :func:`tiled_rows_conv2d`: :func:`_schedule_row_tiles`)."""
    main = find_block(sch, ROWS_CONV_BLOCK)
    if ROW_TILE_ATTR in sch.get(main).annotations:
        _schedule_row_tiles(sch, cfg)
        return
    offsets = find_block(sch, ROWS_OFFSET_BLOCK)
    b, r, i, q, tap = sch.get_loops(main)
    _, tiles, rows, pixels, max_taps = loop_extents(sch, main)
    work = 2 * tiles * rows * pixels * max_taps
    schedule_pixel_stages(sch, main, cfg, work)
    sch.fuse(*sch.get_loops(offsets))
    tile_pixels(sch, main, cfg, work, (b, r, q), [tap], [i], [i])


def _schedule_row_tiles(sch, cfg: CpuScheduleConfig) -> None:
    """Parallel over (image, tile rows, tile columns, filter tile) -> taps of the tile
    (bounded by its count) -> the tile's filters, rows and pixel vectors (unrolled) ->
    lanes (vector); the output stage (with the epilogue) at the tile, so the
    accumulators go from registers to the blocked output.

    That write-back transposes ``R`` filters' pixel vectors into pixels' channel
    vectors, which LLVM does in registers (unpack and insert shuffles). Through a
    ``[N, C, pixels]`` buffer and a copy it cost more than the kernel at high rates:
    1x1 96->576 @14, UBP 4 x 1 at 10x (Zen3, 1 thread), 0.140 ms against 0.072."""
    main = find_block(sch, ROWS_CONV_BLOCK)
    offsets = find_block(sch, ROWS_OFFSET_BLOCK)
    b, r, i, oh, x, tap = sch.get_loops(main)
    _, tiles, rows, out_h, width, max_taps = loop_extents(sch, main)
    quantum, height, tile_width = (int(v) for v in sch.get(main).annotations[ROW_TILE_ATTR])
    tile = RowTile(quantum, height, tile_width, (out_h, width))
    work = 2 * tiles * rows * out_h * width * max_taps
    _schedule_padding_copy(sch, cfg, work)
    last = _inline_epilogue(sch, main)
    sch.fuse(*sch.get_loops(offsets))
    oh_o, oh_i = sch.split(oh, [None, height])
    x_o, x_v, x_l = sch.split(x, [None, tile_width // quantum, quantum])
    order = [b, r, oh_o, x_o] if cfg.sparse_parallel == "blocks" else [b, oh_o, x_o, r]
    # the fewer of the tap's broadcasts and input vectors stay live across the other
    inner = [oh_i, x_v, i] if rows <= tile.vectors else [i, oh_i, x_v]
    sch.reorder(*order, tap, *inner, x_l)
    outer = sch.fuse(*order)
    sch.reverse_compute_at(last, outer)
    written = sch.get_loops(last)[1:]  # the tile's (channel block, row, column, lane)
    for loop in written[:-1]:
        sch.unroll(loop)
    sch.vectorize(written[-1])
    for loop in (i, oh_i, x_v):
        sch.unroll(loop)
    sch.vectorize(x_l)
    if work >= cfg.parallel_min_flops:
        sch.parallel(outer)
    sch.decompose_reduction(main, tap)  # after parallel, which refuses a split reduction
