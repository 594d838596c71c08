"""Unaligned-block (UBP) GEMM: one rotated weight vector per block, or phase planes.

Lee & Shin, "Unaligned Block Pruning", 2024: a kept block is ``GR`` consecutive output
rows of one input column, starting at any row. With the output rows as the vector axis
(``GR`` = the SIMD lanes), a block that starts at row ``16 g + s`` (16 lanes) covers
lanes ``s..15`` of output group ``g`` (its head) and lanes ``0..s-1`` of group
``g + 1`` (its tail). Cutting it into two zero-padded pieces (the gathered kernel's
form) stores and streams two vectors per block, and a GEMM at batch 1 is bound by the
bytes of its weights. Here each block is stored once, rotated by ``s`` so that lane ``l`` holds
the weight of row ``16 g + l`` where ``l >= s`` and of row ``16 (g + 1) + l`` where
``l < s``: the same vector feeds the head's partial sum (masked to ``l >= s``) and the
tail's (masked to ``l < s``), and the output of group ``g`` is its heads plus group
``g - 1``'s tails. Two masked FMAs per block where an aligned block takes one, but the
bytes of an aligned block. FC 1024->1000 in 16 x 1 blocks (AVX-512, 1 thread): 0.066,
0.035, 0.018, 0.009 ms at 2/3/5/10x, against 0.116, 0.063, 0.019, 0.010 for the
pieces and 0.046, 0.018, 0.010, 0.005 for aligned blocks.

Blocks shorter than the vector would leave a rotated vector mostly zeros; they go to
phase planes instead (:func:`pack_phases`): a block starting at row ``GR g + s`` is
aligned in the tiling shifted by ``s``, so the blocks of each phase ``s`` form an
aligned block-sparse weight of their own, one tap per block in tiles of ``GR`` rows,
and the output sums the planes at their shifts (:func:`phase_dense`). FC 1024->1000
in 4 x 1 blocks at 2/3/5/10x: 0.088/0.047/0.026/0.014 ms, aligned 0.092/0.050/0.027/
0.013. With SIMD-wide blocks a plane's tile holds few blocks (an eighth of an aligned
tile's on AVX2, a sixteenth on AVX-512): the planes still win on 8 lanes, the rotated
form was as fast or faster on 16 (``relay_passes.sparse_kernels.ROTATED_MIN_LANES``).
Where SIMD-wide planes lose to aligned blocks (FC 1024->1000 in 8 x 1 blocks at 10x,
Zen3, 1 thread, 10th percentiles of interleaved rounds): 0.0103 ms against 0.0079, and
0.0019 with every count 0. The taps run the same loop as aligned tiles' (the same
instructions per tap); the difference is the 1008 plane tiles against 126, each with
its loop's setup, remainder and chain sum, about 2.7 ns. Equal counts in every tile
ran no faster (the loop exits are not the cost), nor did one or four chains for two;
one stream of every tap adding into its plane row in memory (no tiles: a load and a
store per tap) ran slower, 0.0184 ms against 0.0147 for the planes and 0.0117 aligned.

Format (:func:`pack_rotated`): group ``k + 1`` holds the blocks starting in output
group ``k`` (group 0 is empty, so every group has a predecessor): ``values [groups,
taps, lanes]`` rotated, ``columns`` and ``shifts [groups, taps]``, ``counts
[groups]``. The kernel is :func:`unaligned_dense`, scheduled by
:func:`.sparse_conv.schedule_sparse_dense` (its two halves are that template's
partial sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tir_schedules.sparse_conv import (DENSE_ROWS_BLOCK, PHASE_PLANES_BLOCK,
                                       SPARSE_DENSE_BLOCK, TAP_AXIS, GatheredWeights,
                                       pack_gathered, sum_partials)


@dataclass(frozen=True)
class RotatedBlocks:
    """A UBP-pruned ``[M, K]`` weight, one rotated vector per block (module docstring)."""

    values: np.ndarray   # float32 [groups, taps, lanes]
    columns: np.ndarray  # int32 [groups, taps]
    shifts: np.ndarray   # int32 [groups, taps]
    counts: np.ndarray   # int32 [groups]
    out_features: int
    in_features: int

    @property
    def lanes(self) -> int:
        return int(self.values.shape[2])

    def blocks(self) -> int:
        return int(self.counts.sum())

    def unpack(self) -> np.ndarray:
        """The dense ``[M, K]`` weight back."""
        lanes = self.lanes
        groups = self.values.shape[0]
        dense = np.zeros(((groups + 1) * lanes, self.in_features), np.float32)
        for g in range(1, groups):
            for t in range(int(self.counts[g])):
                shift, column = int(self.shifts[g, t]), int(self.columns[g, t])
                rows = (g - 1) * lanes + shift + np.arange(lanes)
                dense[rows, column] += np.roll(self.values[g, t], -shift)
        return dense[:self.out_features]


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


def pack_rotated(weight: np.ndarray, lanes: int) -> RotatedBlocks:
    """Pack a UBP-pruned ``[M, K]`` weight (zeros = pruned; any mask works: its
    nonzeros are covered by ``lanes``-row blocks, :func:`cover_blocks`)."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight of shape {weight.shape}: a [M, K] GEMM weight expected")
    out_features, in_features = weight.shape
    height = max(out_features, lanes)
    padded = np.zeros((height + lanes, in_features), np.float32)
    padded[:out_features] = weight
    taken = np.zeros_like(padded, dtype=bool)
    groups = -(-height // lanes) + 1
    per_group: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(groups)]
    for column, start in cover_blocks(padded[:height], lanes):
        rows = slice(start, start + lanes)
        block = np.where(taken[rows, column], 0.0, padded[rows, column])
        taken[rows, column] = True
        group, shift = divmod(start, lanes)
        per_group[group + 1].append((column, shift, np.roll(block, shift)))
    most = max(1, max(len(g) for g in per_group))
    values = np.zeros((groups, most, lanes), np.float32)
    columns = np.zeros((groups, most), np.int32)
    shifts = np.zeros((groups, most), np.int32)
    for g, blocks in enumerate(per_group):
        for t, (column, shift, vector) in enumerate(blocks):
            values[g, t], columns[g, t], shifts[g, t] = vector, column, shift
    counts = np.array([len(g) for g in per_group], np.int32)
    return RotatedBlocks(values, columns, shifts, counts, out_features, in_features)


def lane_masks(lanes: int) -> np.ndarray:
    """float32 ``[2, lanes, lanes]``: ``[0, s]`` is 1 on lanes ``>= s`` (a block's
    head), ``[1, s]`` on lanes ``< s`` (its tail). A table lookup and a multiply per
    half, where computing the mask takes a compare, a move and a convert."""
    lane = np.arange(lanes)
    heads = (lane[None, :] >= lane[:, None]).astype(np.float32)
    return np.stack([heads, 1.0 - heads])


def unaligned_dense(data, values, columns, shifts, counts, masks, out_features: int):
    """``data [N, K] @ W.T`` for a :class:`RotatedBlocks` weight -> ``[N, M]``
    (``masks``: :func:`lane_masks`).

    Per group and half (0: heads, 1: tails), the sum over the group's blocks of the
    rotated vector, masked to the half's lanes, times the block's input (the two halves
    are independent FMAs, enough to hide their latency at batch 1); output group ``g``
    adds group ``g + 1``'s heads and group ``g``'s tails (the packed groups are one
    ahead)."""
    from tvm import te

    n = int(data.shape[0])
    groups, taps, lanes = (int(v) for v in values.shape)
    if out_features > (groups - 1) * lanes:
        raise ValueError(f"unaligned_dense: {out_features} outputs do not fit {groups - 1} "
                         f"groups of {lanes}")
    t = te.reduce_axis((0, taps), name=TAP_AXIS)

    def body(i, g, half, o):
        product = values[g, t, o] * masks[half, shifts[g, t], o] * data[i, columns[g, t]]
        return te.sum(te.if_then_else(t < counts[g], product, 0.0), axis=t)

    parts = te.compute((n, groups, 2, lanes), body, name=SPARSE_DENSE_BLOCK)
    return te.compute((n, out_features),
                      lambda i, m: (parts[i, m // lanes + 1, 0, m % lanes]
                                    + parts[i, m // lanes, 1, m % lanes]),
                      name=DENSE_ROWS_BLOCK)


@dataclass(frozen=True)
class PhaseBlocks:
    """A UBP-pruned ``[M, K]`` weight as aligned blocks on phase planes (:func:`pack_phases`)."""

    gathered: GatheredWeights  # of the [phases * plane_rows, K] stacked weight
    phases: int
    plane_rows: int


def pack_phases(weight: np.ndarray, rows: int) -> PhaseBlocks:
    """Pack a UBP-pruned ``[M, K]`` weight (any mask: its nonzeros are covered by
    ``rows``-row blocks, :func:`cover_blocks`) as aligned ``rows``-row blocks.

    A block starting at row ``rows * g + s`` is aligned in the tiling shifted by its
    phase ``s``: it goes to plane ``s`` (``plane_rows`` rows, a first tile of margin),
    at rows ``s * plane_rows + rows + rows * g ..``. The planes stacked are an aligned
    block-sparse weight, one tap per block (:func:`.sparse_conv.pack_gathered`), and
    output ``m`` sums row ``s * plane_rows + rows + m - s`` of every plane
    (:func:`phase_dense`)."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight of shape {weight.shape}: a [M, K] GEMM weight expected")
    out_features, in_features = weight.shape
    height = max(out_features, rows)
    padded = np.zeros((height, in_features), np.float32)
    padded[:out_features] = weight
    plane_rows = rows + -(-height // rows) * rows
    stacked = np.zeros((rows * plane_rows, in_features), np.float32)
    taken = np.zeros(padded.shape, bool)  # a block moved up to end by the last row
    for column, start in cover_blocks(padded, rows):  # may overlap the one above it
        window = slice(start, start + rows)
        group, phase = divmod(start, rows)
        first = phase * plane_rows + rows + group * rows
        stacked[first:first + rows, column] = np.where(taken[window, column], 0.0,
                                                       padded[window, column])
        taken[window, column] = True
    return PhaseBlocks(pack_gathered(stacked, rows), rows, plane_rows)


@dataclass(frozen=True)
class FlatTaps:
    """A gathered weight's taps back to back, each tile's padded to whole chains:
    ``values [taps, bf]``, ``columns [taps]``, tile ``b``'s from ``offsets[b]``, its
    ``counts[b]`` real ones. Phase planes hold from a few to hundreds of blocks per
    tile, and the gathered ``[tiles, most taps, bf]`` array padded every tile to the
    fullest: FC 1024->1000 in 4 x 1 blocks at 2x, 5.0 MB for 2.0 MB of taps, streamed
    with a gap at every tile (0.153 ms; back to back 0.105)."""

    values: np.ndarray
    columns: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    most: int  # the most taps of a tile, a multiple of the chains


def flat_taps(gathered: GatheredWeights, chains: int) -> FlatTaps:
    """:class:`FlatTaps` of a :class:`.sparse_conv.GatheredWeights`."""
    counts = np.asarray(gathered.counts, np.int32)
    padded = -(-counts // chains) * chains
    offsets = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int32)
    total = int(padded.sum()) or chains
    values = np.zeros((total, gathered.values.shape[2]), np.float32)
    columns = np.zeros(total, np.int32)
    taps = gathered.gemm_taps()
    for tile, (start, count) in enumerate(zip(offsets, counts)):
        values[start:start + count] = gathered.values[tile, :count]
        columns[start:start + count] = taps[tile, :count]
    return FlatTaps(values, columns, offsets, counts, max(int(padded.max(initial=0)), chains))


def phase_dense(data, values, columns, offsets, counts, out_features: int, chains: int,
                phases: int, plane_rows: int, most: int):
    """``data [N, K] @ W.T`` -> ``[N, M]`` for a :class:`PhaseBlocks` weight whose taps
    are :class:`FlatTaps` (``most``: its ``most``).

    The gathered GEMM over the stacked planes (tile ``b``'s tap ``t * chains + u`` adds
    to partial sum ``u``, as :func:`.sparse_conv.sparse_dense`), its chains summed per
    tile (``PHASE_PLANES_BLOCK``, which the schedule computes at the tile: one vector
    per tile leaves the registers), then output ``m`` sums row ``s * plane_rows + bf +
    m - s`` of every plane ``s``. At batch 1 the kernel streams its weights; the planes
    are written and read back beside them, a cost per tile that high rates feel (FC
    1024->1000 in 8 x 1 blocks at 10x on Zen3: 0.0149 ms with every chain written and
    read back, 0.0133 summed at the tile; aligned blocks 0.0110)."""
    from tvm import te

    n = int(data.shape[0])
    tiles, out_block = int(counts.shape[0]), int(values.shape[1])
    if tiles * out_block != phases * plane_rows or out_features + out_block > plane_rows:
        raise ValueError(f"phase_dense: {tiles} tiles of {out_block} are not {phases} "
                         f"planes of {plane_rows} rows for {out_features} outputs")
    if most % chains:
        raise ValueError(f"phase_dense: {most} taps are not whole chains of {chains}")
    t = te.reduce_axis((0, most // chains), name=TAP_AXIS)

    def body(i, b, u, o):
        tap = offsets[b] + t * chains + u
        bound = (counts[b] + (chains - 1)) // chains
        return te.sum(te.if_then_else(t < bound, values[tap, o] * data[i, columns[tap]], 0.0),
                      axis=t)

    partial = te.compute((n, tiles, chains, out_block), body, name=SPARSE_DENSE_BLOCK)
    u = te.reduce_axis((0, chains), name="chain")
    planes = te.compute((n, tiles, 1, out_block),  # one chain: sum_partials reads it
                        lambda i, b, _, o: te.sum(partial[i, b, u, o], axis=u),
                        name=PHASE_PLANES_BLOCK)
    return te.compute((n, out_features), lambda i, m: sum_partials(
        planes, i, [s * plane_rows + out_block + m - s for s in range(phases)], 1,
        out_block), name=DENSE_ROWS_BLOCK)
