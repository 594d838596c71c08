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
  compile-time constant: one code path per pattern, no per-element index. The pattern
  loops run in a chain where each shares the most entries with the one before
  (:func:`chain_patterns`), so fewer accumulators move between registers and memory
  at each loop boundary (1-3% on AVX2 in minimums of interleaved runs).
* **Load-redundancy elimination.** Vectorized along output pixels (the flat padded
  grid of :mod:`.sparse_conv`'s pixel machinery in :mod:`.sparse_csr`): the kernel's
  channel offset is loaded once for its 4 entries, each weight broadcast once for the
  whole pixel tile, and each input vector feeds ``tile / lanes`` accumulators' FMAs
  without reloads; the 4 entries of a kernel share input rows, which stay in L1.
  Across filters nothing is shared (two filters rarely keep the same channel with the
  same pattern), so no filter tile is formed: it would compute zeros.

Two forms of the same math (a target picks one in its schedule, see
:func:`entries_form_pays`):

* the **direct** form (:func:`pattern_conv2d`): per output pixel, every kept entry's
  input is loaded with its own shift; any stride, and the form the GPU schedule runs;
* the **entry** form (:func:`pattern_entries_conv2d`, CPUs, stride 1): every kept
  kernel's input vector is loaded once, at one aligned address, and feeds the FMAs of
  all 4 of its entries into per-entry accumulators (the 9 positions of the 3x3 window
  stay in registers across all patterns where 32 registers allow; AVX2's 16 hold the 4
  of one pattern at a time); a second stage sums the entries' planes at
  their constant shifts. Loads per FMA drop from about 1 + 1/tile to 0.6, at the price
  of products at the zero column between input rows and of the last tile's rounding
  (the padding rows' products are zeros nobody computes). On a 3x3 128->128 conv at
  28x28 pruned 3x (AVX-512, 1 thread): 0.70 ms against 1.56 ms for the direct form
  and 1.37 ms for TVM's dense kernel. Where the row pitch rounded up to the SIMD width
  wastes little (a 14-wide map: 16), the entries of one kernel column share a plane
  and their row offsets move into the (still aligned) loads: 3 planes, so a 7-vector
  tile, a third of the loop exits (:class:`EntryForm`, :func:`choose_entry_form`); on
  256->256 at 14x14 pruned 3x, 0.67 ms against 0.73 ms with 9 planes.

Where the entry form's time goes (128->128 at 28x28 pruned 3x, 0.65 ms, AVX-512, 1
thread; perf samples, and the same kernel with every trip count set to 0, 0.17 ms): the
FMA loop about 70%, at about 70% of the FMA ports' peak (with every kernel reading one
channel it runs 10% faster: the rest of the input tile misses L1); the products'
write-back and the shift-sum about a fifth (27 vectors per filter and tile into the
filter group's 260 KB, bound by L2 stores, then read back 9 to 1); the blocked-to-planar
input copy 22 us and the output transposition 12 us (each walks its contiguous side,
:func:`.sparse_csr.schedule_pixel_stages`; they took 41 and 26 us as gathers). Trip
counts that differ between filters cost 2% once the branch predictor has seen a call,
and 0.1 ms on the first call after a pause.

On AVX2 (Zen3, 1 thread, the same layer, 1.18 ms on a quiet host): 0.24 ms with every
trip count 0, of which the input copy a quarter, the products' write-back and the
shift-sum a fifth each, the output transposition a seventh, the pattern loops' entries
and spills the rest; the kernel loops run 5.0 M vector FMAs in the other 0.94 ms, at
about the rate TVM's dense kernel runs its 14.5 M (2.65 ms). So 3x fewer products leave
at most about 2.3x over dense once the fixed costs are paid. Equal trip counts for every
(filter, pattern) ran 2% faster (the loop exits are not the cost), and groups of one
filter (30 KB of products, in L1) saved 0.013 ms of the 0.24: a shift-sum lagging the
products would not pay for its loop nest.

Entry planes read their input in pixel tiles (:func:`.sparse_csr.tiled_flat_input`):
one tile of every channel is one contiguous block, where from channel planes a tile's
reads were as many streams as the layer has channels, more than a core's prefetcher
follows. On the AVX2 host (Zen3, 1 thread, 128->128 at 28x28 pruned 3x, 80
interleaved rounds): 1.40 ms against 1.61 ms from planes (medians; minimums 1.25 and
1.42), dense TVM 2.84 ms; from planes with every kernel reading one channel (all in
L1) the minimum was 1.19 ms, so the tiles win back most of what planes lose to misses
(256->256 at 14x14: 1.64 against 1.69 ms, minimums 1.24 and 1.30). Column planes read
at row shifts that cross tiles, and keep the planes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from npas_tvm.schemes.pattern import CANDIDATE_BITS, CANDIDATES, CENTRE, PATTERN_SIZE
from tir_schedules.common import find_block, largest_divisor, loop_extents
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.sparse_conv import SPARSE_CONV_BLOCK, TAP_AXIS
from tir_schedules.sparse_csr import (TILE_ATTR, blocked_output, flat_input, pixel_grid,
                                      pixel_tile_of, schedule_pixel_stages, tile_pixels,
                                      tiled_flat_input, unroll_tile)

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


def chain_patterns(patterns: Sequence[int]) -> tuple[int, ...]:
    """``patterns`` (ids) in the order the kernels' pattern loops run: each next the one
    sharing the most entries with the last (ties: the lower id), from the first.

    Consecutive pattern loops that share entries share accumulator planes: where the
    registers cannot hold all 9 planes (AVX2's 16), the shared planes' accumulators
    stay in registers across the loop boundary instead of being stored and reloaded.
    """
    order, rest = list(patterns[:1]), list(patterns[1:])
    while rest:
        last = CANDIDATES[order[-1]]
        following = max(rest, key=lambda q: (int(np.count_nonzero(CANDIDATES[q] & last)), -q))
        rest.remove(following)
        order.append(following)
    return tuple(int(p) for p in order)


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
    patterns = chain_patterns(patterns)
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


def _lookup(p, e, table: list[list[int]]):
    """``table[p][e]`` as an expression that folds to a constant once ``p`` and ``e``
    are unrolled (a chain of selects on equalities; the entries that are 0 fall
    through to the default 0)."""
    from tvm import te

    expr = te.const(0, "int64")
    p, e = p.astype("int64"), e.astype("int64")  # the index dtype may change later
    for pp, row in enumerate(table):
        for ee, value in enumerate(row):
            if value:
                expr = te.if_then_else(te.all(p == te.const(pp, "int64"),
                                              e == te.const(ee, "int64")),
                                       te.const(value, "int64"), expr)
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
        address = (channels[s, p, j].astype("int64") * grid.plane + _lookup(p, k, table)
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


# --- the entry-shift form (stride 1) ---------------------------------------------------

PATTERN_ENTRY_BLOCK = SPARSE_CONV_BLOCK + "_entries"  # bound_tap_loops finds the prefix
PATTERN_SHIFT_BLOCK = "npas_pattern_shift_sum"


@dataclass(frozen=True)
class EntryForm:
    """How :func:`pattern_entries_conv2d` lays out a layer (chosen by
    :func:`choose_entry_form`).

    ``fold_rows=False``: one accumulator plane per kernel entry (9), the input rows a
    zero gap apart (pitch ``W + 1`` for a same-padded map), products skipped on the
    padding rows. ``fold_rows=True``: one plane per kernel column (3); the row offset
    of an entry is applied at its input load instead, which stays aligned because the
    row pitch is rounded up to the SIMD width (16 lanes: a 14-wide map keeps its 16,
    a 28-wide one grows from 30 to 32). Three planes stay in registers across patterns
    with a tile of 7 vectors where nine allow 3 (on AVX-512): a third of the pattern
    loops (whose exits the branch predictor misses when their trip counts vary) and a
    third of the shift-sum."""

    fold_rows: bool
    tile: int


def _entry_layout(form: EntryForm, height: int, width: int, padding, dilation, lanes: int):
    """(pitch, plane padding (top, left, bottom, right), products in use) of a form."""
    top, left, bottom, right = (int(v) for v in padding)
    out_h = height + top + bottom - 2 * int(dilation[0])
    if form.fold_rows:
        pitch = -(-(width + left + right) // lanes) * lanes
        live = -(-out_h * pitch // form.tile) * form.tile
        rows = max(height + top + bottom, -(-(live + 2 * int(dilation[0]) * pitch) // pitch))
        return pitch, (top, left, rows - height - top, pitch - width - left), live
    gap = max(left, right)
    pitch = width + gap
    live = -(-height * pitch // form.tile) * form.tile
    return pitch, (0, gap, -(-live // pitch) - height, 0), live


def pattern_entries_conv2d(data, weights, channels, counts, position, patterns: Sequence[int],
                           strides: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], pixel_tile: int, out_block: int,
                           lanes: int = 16, fold_rows: bool = False):
    """Pattern-sparse 3x3 convolution with stride 1 as 1x1 products, then shifts.

    Per filter ``s`` and accumulator plane ``e``: ``acc[s, e, r] = sum_(p, j, k) w[s, p,
    j, entry k of plane e in p] * x[channel[s, p, j], r + row shift of k]`` over the
    input plane, then ``out[s, q] = sum_e acc[s, e, q + offset(e)]``. A plane is one
    kernel entry (its input read unshifted) or, with ``form.fold_rows``, one kernel
    column (its three rows read at aligned row shifts): see :class:`EntryForm`. The
    products read each kept kernel's input vectors once for its 4 entries, at aligned
    addresses (planes start at multiples of ``lanes``); with the pattern loop unrolled,
    kernel ``j`` of pattern ``p`` adds to the planes of ``p``'s entries and no other
    (the other terms are constant zeros, folded away): one code path per pattern, and
    the pattern's planes' accumulators stay in registers over its kernels (see
    :func:`choose_entry_form`). Same arrays and result as :func:`pattern_conv2d`;
    ``pixel_tile`` and ``fold_rows`` are an :class:`EntryForm`'s (Relax's ``call_te``
    passes numbers, not objects).

    Only the planes' own pixels are multiplied (entry planes: the input rows a zero gap
    apart, and the products of the padding rows are zeros no FMA computes: the tiles
    outside the input rows get a trip count of 0, ``counts * live``).
    """
    from tvm import te

    if tuple(int(s) for s in strides) != (1, 1):
        raise ValueError("the entry-shift form needs stride 1; use pattern_conv2d")
    n, _, height, width, _ = (int(v) for v in data.shape)
    filters, npat, most, size = (int(v) for v in weights.shape)
    if npat != len(patterns) or size != PATTERN_SIZE:
        raise ValueError(f"weights {tuple(weights.shape)} vs {len(patterns)} patterns")
    if filters % out_block:
        raise ValueError(f"{filters} output channels are not a multiple of the output "
                         f"block {out_block}")
    top, left, bottom, right = (int(v) for v in padding)
    dil_y, dil_x = (int(v) for v in dilation)
    out_h, out_w = height + top + bottom - 2 * dil_y, width + left + right - 2 * dil_x
    form = EntryForm(bool(int(fold_rows)), int(pixel_tile))
    tile = form.tile
    pitch, plane_padding, live = _entry_layout(form, height, width, padding, dilation, lanes)
    grid = pixel_grid(data.shape, (1, 1), (1, 1), plane_padding, (1, 1), tile,
                      plane_quantum=lanes)
    used = sorted({int(e) for pid in patterns for e in np.flatnonzero(CANDIDATES[pid])})
    slot = [[0] * 9 for _ in patterns]  # 1 + the entry's index in pattern p's 4 weights
    for p, pid in enumerate(patterns):
        for k, e in enumerate(np.flatnonzero(CANDIDATES[pid])):
            slot[p][int(e)] = k + 1
    if form.fold_rows:  # plane = kernel column; fold k = kernel row, read k rows lower
        planes = sorted({e % 3 for e in used})
        entry_of = [[ky * 3 + kx for ky in range(3)] for kx in planes]
        load_shift = [ky * dil_y * pitch for ky in range(3)]
        offsets = [kx * dil_x for kx in planes]
    else:  # plane = kernel entry, read unshifted
        planes = used
        entry_of = [[e] for e in used]
        load_shift = [0]
        gap = plane_padding[1]
        offsets = [(e // 3 * dil_y - top) * pitch + gap + e % 3 * dil_x - left for e in used]
    # member[p][plane * folds + k] = 1 + the weight index of (plane, fold k) in pattern p
    member = [[slot[p][entry] for row in entry_of for entry in row] for p in range(npat)]
    folds = len(entry_of[0])
    # entry planes: products at r = margin + plane position; the margin (whole tiles)
    # takes the shift-sum's reads above the first input row
    margin = -(-max(0, -min(offsets)) // tile) * tile
    sums = -(-((out_h - 1) * pitch + out_w) // lanes) * lanes
    positions = -(-max(margin + sums + max(offsets), margin + live) // tile) * tile
    first, last = margin // tile, (margin + live) // tile
    tiled = not form.fold_rows  # see tiled_flat_input
    if tiled:
        flat = tiled_flat_input(data, grid, live)
    else:
        flat = flat_input(data, grid, grid.channels * grid.plane)

    def input_at(b, channel, x):
        return flat[b, grid.tiled_offset(channel, x) if tiled else channel * grid.plane + x]
    p = te.reduce_axis((0, npat), name="pattern")
    j = te.reduce_axis((0, most), name=TAP_AXIS)
    k = te.reduce_axis((0, folds), name="fold")
    shift = _lookup(k, te.const(0, "int64"), [[v] for v in load_shift])

    def products(b, m, e, r):  # output channel m, stored at position[m]
        s = position[m]
        index = _lookup(p, e * folds + k, member)
        in_pattern = (index > 0).astype("float32")  # 1 or 0 once unrolled: folds away
        term = (weights[s, p, j, te.max(index - 1, 0)] * in_pattern
                * input_at(b, channels[s, p, j].astype("int64"), r - margin + shift))
        bound = counts[s * npat + p]
        if first > 0 or last < positions // tile:
            t = r // tile  # 1 inside the input rows, else 0, in a form that stays a
            bound = bound * (te.min(te.max(t - first + 1, 0), 1)  # function of the tile
                             * te.min(te.max(last - t, 0), 1)).astype("int32")
        return te.sum(te.if_then_else(j < bound, term, 0.0), axis=[p, j, k])

    acc = te.compute((n, filters, len(planes), positions), products, name=PATTERN_ENTRY_BLOCK,
                     attrs={TILE_ATTR: tile})

    def shifted(b, s, unit, q):  # the unit axis: one per products' axis (see schedule)
        total = acc[b, s, 0, q + margin + offsets[0]]
        for e in range(1, len(planes)):
            total = total + acc[b, s, e, q + margin + offsets[e]]
        return total

    summed = te.compute((n, filters, 1, sums), shifted, name=PATTERN_SHIFT_BLOCK)
    return blocked_output(lambda b, m, q: summed[b, m, 0, q], n, None, filters, out_block,
                          out_grid=(out_h, out_w, pitch))


def schedule_pattern_entries(sch, cfg: CpuScheduleConfig) -> None:
    """Parallel over (image, group of filters) -> [the group's products: pixel tiles ->
    filters -> patterns (unrolled) -> the pattern's kernels (bounded by the count) ->
    folded rows and planes (unrolled) -> pixel vectors (unrolled) -> lanes] -> the
    shift-sum, vectorized along pixels."""
    entries = find_block(sch, PATTERN_ENTRY_BLOCK)
    shift = find_block(sch, PATTERN_SHIFT_BLOCK)
    _, filters, used, positions, npat, most, _ = loop_extents(sch, entries)
    work = 2 * filters * PATTERN_SIZE * positions * most * npat
    schedule_pixel_stages(sch, shift, cfg, work)
    b, s, _, q = sch.get_loops(shift)
    s_o, _ = sch.split(s, [None, _filter_group(filters, 4 * used * positions, cfg)])
    outer = sch.fuse(b, s_o)
    _, q_l = sch.split(q, [None, cfg.lanes])
    sch.vectorize(q_l)
    if work >= cfg.parallel_min_flops:
        sch.parallel(outer)
    # the products of one filter, computed where the shift-sum needs them, over the
    # whole row: the sum's reads span all but its ends, and computing exactly those
    # would move the tiles off the aligned loads and split them with a predicate
    products = sch.get(entries).writes[0].source
    read = [i for i, region in enumerate(sch.get(shift).reads)
            if region.source.same_as(products)][0]

    def whole_row(b, s, _unit, q):
        from tvm import tirx

        def span(extent):
            return tirx.const(0, str(q.ty)), tirx.const(extent, str(q.ty))

        return b, s, span(used), span(positions)

    sch.annotate_buffer_access(shift, read, "read", whole_row)
    sch.compute_at(entries, outer, preserve_unit_loops=True)
    s_i, e, r, p, j, k = sch.get_loops(entries)[-6:]
    tile = pixel_tile_of(sch, entries)
    vectors = max(1, tile // cfg.lanes)
    r_o, r_v, r_l = sch.split(r, [None, vectors, tile // vectors])
    sch.reorder(r_o, s_i, p, j, k, e, r_v, r_l)
    acc = sch.cache_write(entries, 0, "local")
    sch.reverse_compute_at(acc, s_i)
    unroll_tile(sch, acc, cfg.lanes, at=s_i)
    for loop in (p, k, e, r_v):
        sch.unroll(loop)
    sch.vectorize(r_l)
    sch.decompose_reduction(entries, p)


def _filter_group(filters: int, products_bytes: int, cfg: CpuScheduleConfig) -> int:
    """Filters per parallel iteration (a divisor of ``filters``): they share each pixel
    tile of the input while it is in L1, where one filter alone would stream the whole
    input from L2 per filter. ``cfg.sparse_filter_group``, or where it is 0 the most
    filters (up to :data:`MOST_GROUPED_FILTERS`) whose products (``products_bytes`` a
    filter) stay within :data:`GROUP_PRODUCTS_BYTES`: each group streams the whole
    input once, and writes its products and reads them back. The groups are the
    parallel loop: at least :data:`PARALLEL_GROUPS` of them where the filters allow."""
    if cfg.sparse_filter_group:
        return largest_divisor(filters, cfg.sparse_filter_group)
    fits = max(1, GROUP_PRODUCTS_BYTES // max(products_bytes, 1))
    most = min(MOST_GROUPED_FILTERS, 1 << (fits.bit_length() - 1),
               max(1, filters // PARALLEL_GROUPS))
    return largest_divisor(filters, most)


# The filter group's products at most (the default group, :func:`_filter_group`), and
# its filters at most. Zen3, 1 thread, pruned 3x, medians of interleaved rounds, groups of
# 8/16/32: 3x3 64->64 @56 (121 KB of products a filter) 1.60/1.70/1.87 ms, 128->128 @28
# (30 KB) 1.27/1.26/1.23, 256->256 @14 (10 KB) 1.36/1.36/1.29, 512->512 @7 2.08/1.78/1.92.
GROUP_PRODUCTS_BYTES = 1 << 20
MOST_GROUPED_FILTERS = 32
PARALLEL_GROUPS = 8  # a phone's cores, big and little


# Planes that do not all fit the registers wait in L1 between patterns: each pattern
# loop reloads and stores its planes' accumulators. A round guess, not fitted: it keeps
# the 3-vector tile measured on AVX-512 for 28x28 (which holds all 9 planes) over a
# 4-vector one that would spill to compute 2% fewer products.
SPILLED_PLANES_COST = 0.1
# FMAs a core keeps in flight: a 4-cycle latency times 2 units (Zen3, Zen4, Ice Lake,
# Cortex-A76). A pattern's kernel loop issues 4 FMAs per vector of the tile, but those
# into one accumulator wait on each other (a column plane takes two of the pattern's
# entries): with fewer independent FMAs per step than this, the loop waits on latency.
FMAS_IN_FLIGHT = 8


def choose_entry_form(lanes: int, registers: int, height: int, width: int,
                      padding: Sequence[int] = (1, 1, 1, 1),
                      dilation: Sequence[int] = (1, 1)) -> EntryForm:
    """The :class:`EntryForm` of a layer: planes and tile whose pattern loop fits the
    registers, and among those the least cost.

    A pattern's kernel loop holds the accumulators of the planes it adds to (entry
    planes: its 4 entries; column planes: up to 3) plus the input vectors and the
    broadcasts: per vector of the tile, 4 entry planes plus 2 registers, or 3 column
    planes with 10 for the inputs and broadcasts (AVX2's 16 registers of 8 lanes allow
    24 or 16 pixels; AVX-512's 32 of 16, 112 or 112; NEON's 32 of 4, 28 or 28). The
    cost: the products computed, rounded up to whole tiles, times ``3 + 1 / vectors``
    (a narrower tile loads its input for fewer FMAs); column planes 4% dearer per
    product (measured on AVX-512: they compute 3% more per position on 28x28 and 9%
    less on 14x14, where their tile is 7 vectors and the entries' 2);
    :data:`SPILLED_PLANES_COST` more where the planes do not all stay in registers
    across patterns; and in proportion where a kernel's step has fewer independent
    FMAs than :data:`FMAS_IN_FLIGHT` (a 1-vector tile of entry planes has 4: half
    speed; column planes need 4 vectors). So on AVX-512 a 14x14 map takes column
    planes (224 products, pitch 16, two tiles of 112) and a 28x28 one entry planes in
    tiles of 48 (816 products at pitch 29, against 896 at pitch 32); on AVX2 both take
    entry planes in tiles of 24 (Zen3, 1 thread, pruned 3x: 128->128 @28 1.46 ms
    against 2.26 ms in tiles of 8, dense TVM 2.95 ms; 256->256 @14 1.39 ms against
    2.42 ms in column planes, dense 2.96 ms), and a 7x7 map tiles of 16 (512->512:
    2.53 ms against 3.09 ms in tiles of 8).

    A term for the spilled accumulators each pattern loop reloads and stores once per
    tile, shared by that loop's kernels (few at high rates), once moved AVX2 to tiles
    of 16 from 5x on 28x28 maps; with the input in pixel tiles, tiles of 24 are as
    fast or faster at every rate (Zen3, 1 thread, 128->128 @28, minimums of 60-80
    interleaved rounds: 5x 0.93 against 0.98 ms, 7x 0.83 against 0.85, 10x 0.73-0.94
    against 0.77-1.00; 64->64 @56 at 10x level), so the kernels' count per loop plays
    no part."""
    entry_vectors = max(1, (registers - 2) // 4)
    column_vectors = max(1, (registers - 10) // 3)
    forms = [EntryForm(fold, lanes * v) for fold, most in ((False, entry_vectors),
                                                           (True, column_vectors))
             for v in range(most, 0, -1)]

    def cost(form: EntryForm) -> float:
        live = _entry_layout(form, height, width, padding, dilation, lanes)[2]
        vectors = form.tile // lanes
        spilled = planes_spill(form, lanes, registers)
        chained = 2 if form.fold_rows else 1  # FMAs per kernel into one accumulator
        waits = max(1.0, FMAS_IN_FLIGHT * chained / (PATTERN_SIZE * vectors))
        return (live * (3 + 1 / vectors) * (1.04 if form.fold_rows else 1.0)
                * (1 + SPILLED_PLANES_COST * spilled) * waits)

    return min(forms, key=cost)


def planes_spill(form: EntryForm, lanes: int, registers: int) -> bool:
    """Whether some of the form's planes wait in L1 between patterns: the registers
    beside one tile of inputs and a broadcast hold fewer tiles of accumulators than
    the form has planes (9 entries or 3 columns)."""
    vectors = form.tile // lanes
    return (registers - vectors - 1) // vectors < (3 if form.fold_rows else 9)


# Kernels per pattern loop (the mean over filters and patterns) below which CPUs whose
# entry planes spill (AVX2) run the direct form. The entry form saves loads per kernel
# but pays, per filter and tile, for its planes: their spill at each pattern loop's
# boundary (AVX2 holds 4 of 9), their write-back and the shift-sum (with every count 0,
# 0.23-0.37 ms on 128->128 @28 against the direct form's 0.09-0.13). With few kernels
# a loop those fixed costs win. 3x3 128->128 @28 in 8 patterns (Zen3, 1 thread,
# medians of 40-80 interleaved calls), entries/direct: 1.83/2.74 ms at 3x (12 kernels
# a loop), 1.11/1.25 at 6x (6), 1.30/1.26 at 7x (5.1), 1.22/1.10 at 8x (4.5), 0.84-1.06
# /0.76-0.86 at 10x (3.6; CSR 0.93-1.03); 256->256 @14: 0.89/1.03 at 6x (12), 0.77/0.85
# at 8x (9), 0.65-0.91/0.68-0.84 at 10x (7.2).
ENTRY_FORM_MIN_KERNELS = 5.0


def entries_form_pays(stride: Sequence[int], family: str, loop_kernels: float = math.inf,
                      spills: bool = False) -> bool:
    """Whether a layer takes :func:`pattern_entries_conv2d` rather than
    :func:`pattern_conv2d`: on CPUs, for stride 1 (the products cover the input plane,
    which stride 2 would compute four times over), and where the entry form's planes
    spill (``spills``, :func:`planes_spill`) only with at least
    :data:`ENTRY_FORM_MIN_KERNELS` kept kernels per pattern loop (``loop_kernels``,
    :func:`kernels_per_loop`). The GPU schedule runs the
    direct form (one work-item per output, no per-filter products buffer)."""
    return (family in ("x86", "arm") and tuple(int(v) for v in stride) == (1, 1)
            and (not spills or loop_kernels >= ENTRY_FORM_MIN_KERNELS))


def kernels_per_loop(packed: PatternWeights) -> float:
    """Kept kernels per (filter, pattern) loop, the mean: the work that a pattern loop's
    fixed costs (its exit, in the entry form its planes' spill) are shared by."""
    return packed.kept_kernels() / max(1, packed.counts.size)
