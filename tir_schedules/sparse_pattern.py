"""Pattern-pruned 3x3 convolution with pattern-specialized code (PatDNN).

Niu et al., "PatDNN: Achieving Real-Time DNN Execution on Mobile Devices with
Pattern-based Weight Pruning", ASPLOS'20; the pattern scheme of NPAS (Li et al.,
CVPR'21). Every kept 3x3 kernel keeps 4 entries drawn from a layer's small pattern set;
connectivity pruning removes whole kernels. The compiler side, as here:

* **Compact storage (FKW).** Per filter and per pattern of the layer: the input
  channels of the kernels that use it (as offsets into the flat input) and their 4
  weights, ``weights [F, patterns, kernels, 4]``, ``channels [F, patterns, kernels]``,
  ``counts [F * patterns]``. Connectivity-pruned kernels are absent: they cost nothing.
* **Filter-kernel reorder.** Filters are stored sorted by their per-pattern kernel
  counts (heaviest first, equal trip counts adjacent); output channel ``m`` finds its
  arrays at ``position[m]`` (one load per filter tile). The kernel still walks output
  channels in order: the parallel loop runs pixel tiles outermost, so every thread gets
  all filters and the same work whatever their counts, and one launch per layer on
  OpenCL can compute each output where it is written.
* **Pattern-specialized code.** The reduction is (pattern ``p``, unrolled) ->
  (kernel ``j < counts[f, p]``, a data-dependent bound) -> (entry ``k``, unrolled);
  the entry's (dy, dx) comes from a constant table indexed by (p, k), so once ``p`` and
  ``k`` are unrolled every input address is the kernel's channel offset plus a
  compile-time constant: one code path per pattern, no per-element index.
* **Load-redundancy elimination.** Vectorized along output pixels (the flat padded
  grid of :mod:`.sparse_conv`'s pixel machinery in :mod:`.sparse_csr`): the kernel's
  channel offset is loaded once for its 4 entries, each weight broadcast once for the
  whole pixel tile, and each input vector feeds ``tile / lanes`` accumulators' FMAs
  without reloads; the 4 entries of a kernel share input rows, which stay in L1.
  Across filters nothing is shared (two filters rarely keep the same channel with the
  same pattern), so no filter tile is formed: it would compute zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from npas_tvm.schemes.pattern import CANDIDATE_BITS, CANDIDATES, CENTRE, PATTERN_SIZE
from tir_schedules.common import find_block, loop_extents
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.sparse_conv import SPARSE_CONV_BLOCK, TAP_AXIS
from tir_schedules.sparse_csr import (TILE_ATTR, blocked_output, flat_input, pixel_grid,
                                      schedule_pixel_stages, tile_pixels)

PATTERN_CONV_BLOCK = SPARSE_CONV_BLOCK + "_pattern"  # bound_tap_loops finds the prefix
_BITS = 1 << np.arange(9)


@dataclass(frozen=True)
class PatternWeights:
    """A pattern-pruned 3x3 weight in FKW form (see the module docstring).

    Stored filter ``s`` is output channel ``filters[s]``; ``position[m]`` is where
    output channel ``m`` is stored. ``channels`` are absolute input channels.
    """

    weights: np.ndarray   # float32 [F, P, J, 4]
    channels: np.ndarray  # int32 [F, P, J]
    counts: np.ndarray    # int32 [F * P]
    position: np.ndarray  # int32 [F]
    patterns: tuple[int, ...]  # the layer's pattern ids (rows of schemes.pattern.CANDIDATES)
    in_channels: int
    groups: int

    @property
    def out_channels(self) -> int:
        return int(self.weights.shape[0])

    def kept_kernels(self) -> int:
        return int(self.counts.sum())

    def entries(self, pattern: int) -> list[tuple[int, int]]:
        """(dy, dx) of the 4 entries of the layer's pattern ``pattern``, in stored order."""
        return [(int(e) // 3, int(e) % 3)
                for e in np.flatnonzero(CANDIDATES[self.patterns[pattern]])]

    def unpack(self) -> np.ndarray:
        """The dense [F, C/groups, 3, 3] weight back."""
        filters, npat, _, _ = self.weights.shape
        group_in = self.in_channels // self.groups
        group_out = filters // self.groups
        dense = np.zeros((filters, group_in, 3, 3), np.float32)
        for m in range(filters):
            s = int(self.position[m])
            base = (m // group_out) * group_in
            for p in range(npat):
                for j in range(int(self.counts[s * npat + p])):
                    for k, (dy, dx) in enumerate(self.entries(p)):
                        dense[m, self.channels[s, p, j] - base, dy, dx] = self.weights[s, p, j, k]
        return dense


def kernel_patterns(weight: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each kernel's pattern id (-1: pruned) and the distinct ids, for any pattern mask.

    A kernel with fewer than 4 nonzeros fits several patterns: it takes one already
    needed where it can (a full-pattern kernel's first), else the candidate covering
    the most such kernels. Raises if a kernel fits no 4-entry pattern with the centre.
    """
    rows = weight.reshape(-1, 9) != 0
    bits = rows.astype(np.int64) @ _BITS
    kept = bits != 0
    need = bits | (1 << CENTRE)
    bad = kept & (rows.sum(axis=1) - rows[:, CENTRE] > PATTERN_SIZE - 1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} kernels keep more than 3 entries besides the "
                         "centre: not a pattern mask")
    ids = np.full(len(bits), -1, np.int64)
    used: list[int] = []
    unique = np.unique(need[kept])
    for b in unique:  # kernels that name their pattern exactly
        exact = np.flatnonzero(CANDIDATE_BITS == b)
        if len(exact):
            used.append(int(exact[0]))
    pending = [int(b) for b in unique]
    choice = {}
    while pending:
        for b in pending:
            fit = [i for i in used if b & int(CANDIDATE_BITS[i]) == b]
            if fit:
                choice[b] = fit[0]
        pending = [b for b in pending if b not in choice]
        if pending:
            covers = [sum(b & int(c) == b for b in pending) for c in CANDIDATE_BITS]
            used.append(int(np.argmax(covers)))
    for b, pid in choice.items():
        ids[kept & (need == b)] = pid
    order = tuple(sorted(set(used) & set(choice.values())))
    return ids, order


def pack_pattern(weight: np.ndarray, groups: int = 1) -> PatternWeights:
    """Pack a pattern-pruned ``[F, C/groups, 3, 3]`` weight (zeros = pruned)."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight of shape {weight.shape}: a 3x3 conv weight expected")
    filters, group_in = weight.shape[:2]
    if filters % groups:
        raise ValueError(f"groups={groups} does not divide the {filters} output channels")
    ids, patterns = kernel_patterns(weight)
    patterns = patterns or (0,)
    ids = ids.reshape(filters, group_in)
    slot = {pid: p for p, pid in enumerate(patterns)}
    npat = len(patterns)
    per = np.zeros((filters, npat), np.int32)
    for p, pid in enumerate(patterns):
        per[:, p] = (ids == pid).sum(axis=1)
    # filter-kernel reorder: equal trip counts adjacent, heaviest first
    order = sorted(range(filters), key=lambda f: (-int(per[f].sum()), tuple(-per[f]), f))
    most = max(int(per.max(initial=0)), 1)
    weights = np.zeros((filters, npat, most, PATTERN_SIZE), np.float32)
    channels = np.zeros((filters, npat, most), np.int32)
    group_out = filters // groups
    flat = weight.reshape(filters, group_in, 9)
    filled = np.zeros(npat, np.int64)
    for s, f in enumerate(order):
        base = (f // group_out) * group_in
        filled[:] = 0
        for c in np.flatnonzero(ids[f] >= 0):
            p = slot[int(ids[f, c])]
            j = int(filled[p])
            filled[p] += 1
            entries = np.flatnonzero(CANDIDATES[patterns[p]])
            weights[s, p, j] = flat[f, c, entries]
            channels[s, p, j] = base + c
    counts = per[order].reshape(-1).astype(np.int32)
    position = np.empty(filters, np.int32)
    position[order] = np.arange(filters, dtype=np.int32)
    return PatternWeights(weights, channels, counts, position, tuple(int(p) for p in patterns),
                          group_in * groups, groups)


# --- compute ---------------------------------------------------------------------------


def _entry_offset(p, k, table: list[list[int]]):
    """The (p, k) entry of a constant table as an expression that folds to a constant
    once ``p`` and ``k`` are unrolled (a chain of selects on equalities)."""
    from tvm import te

    expr = te.const(table[-1][-1], "int64")
    for pp in range(len(table) - 1, -1, -1):
        for kk in range(len(table[pp]) - 1, -1, -1):
            if (pp, kk) == (len(table) - 1, len(table[pp]) - 1):
                continue
            expr = te.if_then_else(te.all(p == pp, k == kk),
                                   te.const(table[pp][kk], "int64"), expr)
    return expr


def pattern_conv2d(data, weights, channels, counts, position, patterns: Sequence[int],
                   strides: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   pixel_tile: int, out_block: int):
    """Pattern-sparse 3x3 convolution, ``NCHW{ib}c`` in, ``NCHW{out_block}c`` out.

    Tensors of the shapes of :class:`PatternWeights`' arrays; ``patterns`` its pattern
    ids (they become constants in the code); ``pixel_tile`` as in
    :func:`.sparse_csr.rows_conv2d`.
    """
    from tvm import te

    n = int(data.shape[0])
    filters, npat, most, size = (int(v) for v in weights.shape)
    if npat != len(patterns) or size != PATTERN_SIZE:
        raise ValueError(f"weights {tuple(weights.shape)} vs {len(patterns)} patterns")
    grid = pixel_grid(data.shape, (3, 3), strides, padding, dilation, pixel_tile)
    flat = flat_input(data, grid)
    table = [[grid.tap_offset(0, int(e) // 3, int(e) % 3)
              for e in np.flatnonzero(CANDIDATES[pid])] for pid in patterns]
    p = te.reduce_axis((0, npat), name="pattern")
    j = te.reduce_axis((0, most), name=TAP_AXIS)
    k = te.reduce_axis((0, PATTERN_SIZE), name="entry")

    def body(b, f, q):
        s = position[f]
        address = (channels[s, p, j].astype("int64") * grid.plane + _entry_offset(p, k, table)
                   + grid.pixel_offset(q))
        return te.sum(te.if_then_else(j < counts[s * npat + p],
                                      weights[s, p, j, k] * flat[b, address], 0.0),
                      axis=[p, j, k])

    acc = te.compute((n, filters, grid.pixels), body, name=PATTERN_CONV_BLOCK,
                     attrs={TILE_ATTR: pixel_tile})
    return blocked_output(lambda b, m, q: acc[b, m, q], n, grid, filters, out_block)


# --- schedule --------------------------------------------------------------------------


def schedule_pattern_conv2d(sch, cfg: CpuScheduleConfig) -> None:
    """Parallel over (image, pixel tile, filter) (``sparse_parallel="blocks"``: filters
    outermost) -> patterns (unrolled) -> the pattern's kernels (bounded by the count)
    -> 4 entries (unrolled) -> pixel vectors (unrolled) -> lanes (vector)."""
    main = find_block(sch, PATTERN_CONV_BLOCK)
    b, f, q, p, j, k = sch.get_loops(main)
    _, filters, pixels, npat, most, _ = loop_extents(sch, main)
    work = 2 * filters * pixels * most * PATTERN_SIZE
    schedule_pixel_stages(sch, main, cfg, work)
    tile_pixels(sch, main, cfg, work, (b, f, q), [p, j, k], [], [p, k])
