"""Unaligned-block (UBP) GEMM: phase tiles.

Lee & Shin, "Unaligned Block Pruning", 2024: a kept block is ``GR`` consecutive output
rows of one input column, starting at any row. A GEMM at batch 1 is bound by the bytes
of its weights, and its vector axis is the output rows, where a block's offset falls
across two tiles of the vector. Here, with tiles of ``h`` rows (about the block's
height, at most the SIMD lanes), a block starting at row ``h g + s`` is aligned in the
tiling shifted by ``s``: one tap of plane ``s``'s tile ``g``, one FMA and one vector,
as an aligned block is; output ``m`` sums row ``m - s`` of every plane.

A plane's tile holds an ``h``-th of an aligned tile's blocks, so one tap loop per tile
paid its setup, exit and partial sums ``h`` times as often as aligned blocks do: FC
1024->1000 in 8 x 1 blocks at 10x (Zen3, 1 thread, 10th percentiles of interleaved
rounds) 0.0103 ms against 0.0079, 0.0019 with every count 0, about 2.7 ns for each of
1008 tiles against 126 (equal counts in every tile, one or four chains for two, and one
stream of every tap adding into its plane row in memory were no faster). So the tiles,
sorted by tap count, run :data:`TILES_PER_LOOP` to a loop, side by side: a loop's setup
and exit serve four tiles, their accumulators are four independent chains (no partial
sums to add), and a tile pads few zero taps up to its loop's most (0.5% more taps at
10x). A tile's sum goes to its plane row, a scatter, which TE cannot write: the kernel
is TIR (:func:`phase_tiles_dense`).

Tried and measured slower (same layer, against aligned blocks in the same run):
- each SIMD-wide block stored once, rotated by its offset so one vector feeds its
  tile's partial sum and the next tile's, each masked to its lanes (two masked FMAs, the
  bytes of an aligned block): on AVX-512 (16 x 1 blocks, Xeon, 1 thread, 10th
  percentiles of 20 interleaved rounds) 1.43 / 1.79 / 1.67 / 1.65x aligned blocks' time
  at 2/3/5/10x, where 16 planes of four tiles a loop took 1.02 / 1.10 / 1.13 / 1.21-1.27
  (two, eight or twelve tiles a loop: 1.19-1.25 at 10x); on AVX2 (Zen3, 8 x 1
  blocks) 1.9-2.0x;
- rotated vectors with one masked FMA a block (the tail's; the head is the total less
  the tail) 1.67x on AVX2;
- one loop per group of rows whose running sum is stored to its tile's slot after every
  pair of taps (a tile's sum the difference of two slots) 1.35x, where one loop per tile
  took 1.26x;
- a block cut into its two pieces (the gathered kernel's form) streams two vectors a
  block, twice the bytes.

Format: :class:`PhaseTiles`, packed by :func:`pack_phase_tiles`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tir_schedules.common import PARALLEL_ATTR, find_block, vectorize_flat
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.sparse_conv import SPARSE_DENSE_BLOCK


def cover_blocks(weight: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """(column, first row) of blocks of ``rows`` rows that cover every nonzero of
    ``weight [M, K]``, fewest per column: a block starts at the column's first
    uncovered nonzero (moved up so it ends by the last row), as UBP's blocks do."""
    height = weight.shape[0]
    blocks = []
    for column in range(weight.shape[1]):
        covered = 0
        for row in np.flatnonzero(weight[:, column]):
            if row < covered:
                continue
            start = max(0, min(int(row), height - rows))
            blocks.append((column, start))
            covered = start + rows
    return blocks


PHASE_TILES_BLOCK = SPARSE_DENSE_BLOCK + "_phase_tiles"  # the family's block (a prefix)
PHASE_MARGIN_BLOCK = "npas_phase_margin"
PHASE_SUM_BLOCK = "npas_phase_sum"
LOOP_BUCKETS = 8
"""Runs of loops of about equal work (:func:`pack_phase_tiles`): the loops sorted by tap
count are dealt to this many runs in turn, so 1, 2, 4 or 8 threads, each taking a
contiguous share, get about equal work. FC 1024->1000 in 8 x 1 blocks on 2 threads, the
loops in count order: 1.31x aligned blocks' time at 10x, dealt to runs 1.17x (at 3x
1.13-1.19x either way, a busy host)."""
TILES_PER_LOOP = 4
"""Plane tiles one tap loop runs side by side (:func:`pack_phase_tiles`). FC 1024->1000
in 8 x 1 blocks (Zen3, 1 thread, 10th percentiles of 40 interleaved rounds), phase tiles
/ aligned blocks at 2/3/5/10x: 1.06/1.02/1.05/1.07 with 4 tiles a loop, 1.05/1.02/
1.07/1.16 with 2, 1.03/1.02/1.07/1.10 with 8; one loop per tile (its taps in two
chains, summed at the tile) 1.07/1.07/1.08/1.27."""


@dataclass(frozen=True)
class PhaseTiles:
    """A UBP-pruned ``[M, K]`` weight on phase planes, its tiles batched by tap count
    (:func:`pack_phase_tiles`).

    Loop ``b`` runs ``tiles`` plane tiles: its tap ``i`` of tile ``u`` is
    ``values[offsets[b] + i * tiles + u]`` (``height`` weights) times input
    ``columns[...]``, for ``i < counts[b]`` (a tile with fewer taps has zero taps up to
    its loop's count), and the tile's sum is row ``rows[b * tiles + u]`` of the planes:
    plane ``s`` holds rows ``s * (groups + 1) ..`` (its first a zero margin), spare rows
    after the last plane take the padding tiles of the last loop."""

    values: np.ndarray   # float32 [taps, height]
    columns: np.ndarray  # int32 [taps]
    offsets: np.ndarray  # int32 [loops]
    counts: np.ndarray   # int32 [loops]
    rows: np.ndarray     # int32 [loops * tiles]
    height: int
    groups: int
    out_features: int
    in_features: int

    @property
    def tiles(self) -> int:
        return int(self.rows.size // max(1, self.counts.size))

    @property
    def plane_rows(self) -> int:
        """Tile rows of a plane: its zero margin, then one per group of ``height`` rows."""
        return self.groups + 1

    def kept_taps(self) -> int:
        """Taps that hold a block (the others pad a tile to its loop's count)."""
        return int(np.count_nonzero(self.values.any(axis=1)))

    def unpack(self) -> np.ndarray:
        """The dense ``[M, K]`` weight back."""
        height, tiles = self.height, self.tiles
        dense = np.zeros((self.groups * height + height, self.in_features), np.float32)
        for b, (offset, count) in enumerate(zip(self.offsets, self.counts)):
            for u in range(tiles):
                phase, tile = divmod(int(self.rows[b * tiles + u]), self.plane_rows)
                if phase >= height:  # a spare row: a padding tile
                    continue
                first = (tile - 1) * height + phase
                for i in range(int(count)):
                    tap = int(offset) + i * tiles + u
                    dense[first:first + height, self.columns[tap]] += self.values[tap]
        return dense[:self.out_features]


def pack_phase_tiles(weight: np.ndarray, height: int,
                     tiles: int = TILES_PER_LOOP) -> PhaseTiles:
    """Pack a UBP-pruned ``[M, K]`` weight (any mask: its nonzeros are covered by
    ``height``-row blocks, :func:`cover_blocks`) on phase planes of ``height``-row tiles.

    A block starting at row ``height * g + s`` is aligned in the tiling shifted by its
    phase ``s``: it is one tap of plane ``s``'s tile ``g``. The tiles, sorted by their
    tap count, go ``tiles`` to a loop, so a loop's tiles pad few zero taps up to its
    most; tiles with no block are in loops too (their plane rows must be written). The
    loops are stored in :data:`LOOP_BUCKETS` runs, each with loops of every count."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight of shape {weight.shape}: a [M, K] GEMM weight expected")
    out_features, in_features = weight.shape
    full = max(out_features, height)
    groups = -(-full // height)
    padded = np.zeros((full, in_features), np.float32)
    padded[:out_features] = weight
    taken = np.zeros(padded.shape, bool)  # a block moved up to end by the last row
    taps: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for column, start in cover_blocks(padded, height):  # may overlap the one above it
        window = slice(start, start + height)
        group, phase = divmod(start, height)
        block = np.where(taken[window, column], 0.0, padded[window, column])
        taken[window, column] = True
        taps.setdefault((phase, group), []).append((column, block))
    order = sorted(((s, g) for s in range(height) for g in range(groups)),
                   key=lambda key: len(taps.get(key, ())))
    spare = height * (groups + 1)
    keys: list[tuple[int, int] | None] = order + [None] * (-len(order) % tiles)
    batches = [keys[first:first + tiles] for first in range(0, len(keys), tiles)]
    # dealt to LOOP_BUCKETS runs in turn: the threads of a parallel loop take contiguous
    # runs of loops, and in count order one thread would get all the long ones
    batches = [b for bucket in range(LOOP_BUCKETS) for b in batches[bucket::LOOP_BUCKETS]]
    values, columns, offsets, counts, rows = [], [], [], [], []
    zero = (0, np.zeros(height, np.float32))
    for batch in batches:
        lists = [taps.get(key, []) if key else [] for key in batch]
        most = max(len(each) for each in lists)
        offsets.append(len(columns))
        counts.append(most)
        for i in range(most):
            for each in lists:
                column, block = each[i] if i < len(each) else zero
                columns.append(column)
                values.append(block)
        for key in batch:
            rows.append(key[0] * (groups + 1) + key[1] + 1 if key else spare)
            spare += key is None
    if not values:
        columns, values = [0], [zero[1]]
    return PhaseTiles(np.array(values, np.float32).reshape(-1, height),
                      np.array(columns, np.int32), np.array(offsets, np.int32),
                      np.array(counts, np.int32), np.array(rows, np.int32), height, groups,
                      out_features, in_features)


def phase_row_tile(batch: int, tiles: int, registers: int) -> int:
    """Rows of the input per loop of :func:`phase_tiles_dense`: the most dividing
    ``batch`` whose ``tiles x rows`` accumulators, a weight vector and a broadcast per
    row fit the registers (each tap's weights are then loaded once for all of them)."""
    return max(r for r in range(1, batch + 1)
               if batch % r == 0 and (tiles * r + r + 1 <= registers or r == 1))


def phase_tiles_dense(batch: int, in_features: int, out_features: int, taps: int,
                      loops: int, tiles: int, height: int, groups: int, row_tile: int = 1):
    """``data [N, K] @ W.T`` for a :class:`PhaseTiles` weight, as a PrimFunc ``(data,
    values, columns, offsets, counts, rows) -> [N, M]``.

    Per loop (parallel), ``tiles x row_tile`` accumulators: each tap adds its weights
    times its input to its tile's, and the tiles' sums go to their plane rows (a
    scatter: TE cannot write one, so the kernel is TIR); then output ``m`` sums row ``m
    - s`` of every plane ``s``, with the fused epilogue."""
    from tvm.script import tirx as T

    if batch % row_tile:
        raise ValueError(f"phase_tiles_dense: a row tile of {row_tile} for {batch} rows")
    plane = (groups + 1) * height  # floats of a plane
    size = height * plane + (loops * tiles - height * groups) * height  # and spare rows
    images = batch // row_tile
    i64 = T.int64

    def plane_sum(planes, b, m):  # output m: row m - s of every plane s
        total = planes[b, height + m]
        for s in range(1, height):
            total = total + planes[b, s * plane + height + m - s]
        return total

    @T.prim_func(s_tir=True)
    def phases(data: T.Buffer((i64(batch), i64(in_features)), "float32"),
               values: T.Buffer((i64(taps), i64(height)), "float32"),
               columns: T.Buffer((i64(taps),), "int32"),
               offsets: T.Buffer((i64(loops),), "int32"),
               counts: T.Buffer((i64(loops),), "int32"),
               rows: T.Buffer((i64(loops * tiles),), "int32"),
               out: T.Buffer((i64(batch), i64(out_features)), "float32")):
        # root-block buffers: the planner places acc at its loop, one per parallel step
        planes = T.sblock_alloc_buffer((i64(batch), i64(size)), "float32")
        acc = T.sblock_alloc_buffer((i64(tiles), i64(row_tile), i64(height)), "float32",
                                    scope="local")
        for b, s, lane in T.grid(i64(batch), i64(height), i64(height)):
            with T.sblock(PHASE_MARGIN_BLOCK):
                vb, vs, vl = T.axis.remap("SSS", [b, s, lane])
                planes[vb, vs * plane + vl] = T.float32(0)
        for r, t in T.grid(i64(images), i64(loops)):
            with T.sblock(PHASE_TILES_BLOCK):
                vr = T.axis.opaque(images, r)
                vt = T.axis.opaque(loops, t)
                T.reads(data[vr * row_tile:vr * row_tile + row_tile, 0:in_features],
                        values[0:taps, 0:height], columns[0:taps], offsets[vt], counts[vt],
                        rows[vt * tiles:vt * tiles + tiles])
                T.writes(planes[vr * row_tile:vr * row_tile + row_tile, 0:size])
                for u in T.unroll(tiles):
                    for i in T.unroll(row_tile):
                        for lane in T.vectorized(height):
                            acc[u, i, lane] = T.float32(0)
                for k in range(counts[vt]):
                    for u in T.unroll(tiles):
                        for i in T.unroll(row_tile):
                            for lane in T.vectorized(height):
                                acc[u, i, lane] = acc[u, i, lane] + values[
                                    offsets[vt] + k * tiles + u, lane] * data[
                                    vr * row_tile + i, columns[offsets[vt] + k * tiles + u]]
                for u in T.unroll(tiles):
                    for i in T.unroll(row_tile):
                        for lane in T.vectorized(height):
                            planes[vr * row_tile + i, rows[vt * tiles + u] * height + lane] = (
                                acc[u, i, lane])
        for b, m in T.grid(i64(batch), i64(out_features)):
            with T.sblock(PHASE_SUM_BLOCK):
                vb, vm = T.axis.remap("SS", [b, m])
                out[vb, vm] = plane_sum(planes, vb, vm)

    return phases.with_attr("op_pattern", 4)  # kOutEWiseFusable: FuseOps adds the epilogue


def schedule_phase_tiles(sch, cfg: CpuScheduleConfig) -> None:
    """The fused epilogue inlined into the planes' sum, which is vectorized along the
    outputs; the margins vectorized; the loops of tiles marked parallel when big (their
    own loops are unrolled and vectorized in the TIR)."""
    from tir_schedules.sparse_csr import inline_epilogue_into

    total = find_block(sch, PHASE_SUM_BLOCK)
    inline_epilogue_into(sch, total)
    vectorize_flat(sch, total, cfg.lanes)
    sch.vectorize(sch.get_loops(find_block(sch, PHASE_MARGIN_BLOCK))[-1])
    tiles = find_block(sch, PHASE_TILES_BLOCK)
    data, values = (region.source for region in sch.get(tiles).reads[:2])
    work = 2 * int(data.shape[0]) * int(values.shape[0]) * int(values.shape[1])
    outer = sch.fuse(*sch.get_loops(tiles))
    if work >= cfg.parallel_min_flops:  # sch.parallel refuses the opaque block
        sch.annotate(outer, PARALLEL_ATTR, 1)
