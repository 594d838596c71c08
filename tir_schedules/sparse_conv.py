"""Sparse CPU kernels for block-punched (KxK conv) and block-based (1x1 conv, FC) pruning.

Both schemes leave every block of ``bf`` consecutive output channels with one set of
kept input taps shared by all its filters (block-punched: the same (channel, kh, kw)
positions; block-based: the same columns). So one compact format and one kernel serve
both:

* :class:`GatheredWeights` stores, per filter block, the list of kept taps
  ``(absolute input channel, kh, kw)`` and a ``[taps, bf]`` matrix of their weights;
* :func:`sparse_conv2d_nchwc` reads ``NCHW{ib}c`` input and writes ``NCHW{bf}c`` output
  (the dense path's layouts, so a sparse layer sits between dense ones with no layout
  transform); :func:`sparse_dense` is the same kernel on a ``[N, K]`` GEMM input.

The kernel vectorizes along the ``bf`` filters of a block: per tap it loads the tap's
index once and its weight vector once for a whole tile of output pixels, and broadcasts
the tap's input value once per pixel into ``bf`` FMAs (the load-redundancy elimination).
There is no per-element index in the inner loop.

Ragged tap counts. Blocks keep different numbers of taps (block_punched keeps a
per-layer percentile). The format pads every block to the largest count (zero weights
at a valid position) and the TE compute guards each tap with ``tap < counts[b]``, so it
is exact whatever the padding holds, scheduled or not. The schedule then turns the
guard into the tap loop's bound (:func:`bound_tap_loops`: the loop's extent becomes
``counts[b]``, a data-dependent bound TIR allows), so padding costs nothing at run
time: no FMA and no branch per padded tap. A block with zero taps writes the epilogue
of 0. (Measured on block_punched 3x3 masks: the largest count is 1.2x the mean, so
computing the padding would cost about 20%.)

Input addressing. The input is first copied, zero-padded, into a flat per-image
buffer and each tap's (channel, kh, kw) is turned into one element offset (both at the
root, once per call); the inner loop then loads one int per tap and adds the pixel's
offset. Indexing the 5-D input directly put a shift, a multiply and adds on the path
from the tap load to the FMAs' addresses, and the kernel ran 20-30% slower.

Load balance. The parallel loop runs over (image, output row, filter block) with the
rows outermost: TVM hands each thread a contiguous chunk of that loop, so every thread
gets whole rows of all blocks and the same work whatever the counts; no thread gets
all the heavy blocks, and the blocks stay in filter order (no permutation of the
output channels, which the next layer would otherwise have to undo).
``sparse_parallel`` selects (image, block, row) instead ("blocks": a block's weights
stay in cache across its rows, but each thread gets a contiguous run of blocks) or
keeps the blocks out of the parallel loop ("rows"); "auto" takes "blocks" on maps of
at most ``SMALL_MAP`` pixels, where weight traffic dominates.

Register tile. Accumulators are (pixel tile) x (``bf`` / lanes) vectors; the tile is
the largest divisor of the output width whose accumulators, one weight vector and one
broadcast fit the vector registers and stay under ``max_local_bytes``. They live in a
``global``-scope buffer of at most 1 KiB, which TVM places on the stack (LLVM keeps it
in registers); TVM 0.27 gives a ``local``-scope buffer a heap workspace allocated per
parallel iteration whatever its size (its alloc, free and zeroing cost 25% on small
layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tir_schedules.common import find_block, fuse_epilogue, loop_extents, vectorize_flat
from tir_schedules.config import CpuScheduleConfig
from tir_schedules.conv2d import PAD_BLOCK, _output_size

SPARSE_CONV_BLOCK = "npas_sparse_conv2d_nchwc"
SPARSE_DENSE_BLOCK = "npas_sparse_dense"
OFFSET_BLOCK = "npas_sparse_tap_offsets"
DENSE_ROWS_BLOCK = "npas_gathered_rows"  # sparse_dense's [N, blocks, bf] -> [N, M]
TAP_AXIS = "tap"
SMALL_MAP = 64
"""Output maps of at most this many pixels (7x7) take the (image, block, row) parallel
order: their weights outweigh their pixels, and a block's stay in cache across its rows
(512->512 @7x7 at 3x, 2 threads: 1.40 ms rows-outer, 0.74 ms blocks-outer; equal on
larger maps)."""


@dataclass(frozen=True)
class GatheredWeights:
    """Per block of ``block`` output channels: the kept taps shared by its filters.

    Block ``b`` holds output channels ``b * block .. b * block + block - 1`` (the last
    block of a GEMM may be ragged: its missing rows have zero weights). Its first
    ``counts[b]`` taps are real, sorted by (channel, kh, kw); the rest are padding with
    zero weights that point at a valid input position.
    """

    values: np.ndarray  # float32 [blocks, taps, block], zero past counts[b]
    taps: np.ndarray  # int32 [blocks, taps, 3]: (absolute input channel, kh, kw)
    counts: np.ndarray  # int32 [blocks]: kept taps per block
    out_channels: int
    in_channels: int  # all groups
    kernel_size: tuple[int, int]
    groups: int
    block: int
    gemm: bool = False  # packed from a [M, K] matrix (unpack gives it back as such)

    @property
    def blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def max_taps(self) -> int:
        return int(self.values.shape[1])

    def kept_macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel over the real taps (padding excluded):
        kept taps x block."""
        return int(self.counts.sum()) * self.block

    def padded_macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel that the scheduled kernel computes: each block
        stops at its own count (:func:`bound_tap_loops`), so no padded tap is computed
        and this equals :meth:`kept_macs_per_pixel`."""
        return self.kept_macs_per_pixel()

    def stored_macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel of the padded arrays (every block at the
        largest count): what a kernel without the count bound would compute."""
        return self.blocks * self.max_taps * self.block

    def gemm_taps(self) -> np.ndarray:
        """int32 [blocks, taps]: the input-feature index of each tap (GEMM kernels)."""
        return np.ascontiguousarray(self.taps[:, :, 0])

    def unpack(self) -> np.ndarray:
        """The dense weight back: [F, C/groups, kh, kw], or [M, K] if packed from one."""
        kh, kw = self.kernel_size
        group_in = self.in_channels // self.groups
        group_out = self.out_channels // self.groups
        rows = self.blocks * self.block
        dense = np.zeros((rows, group_in, kh, kw), np.float32)
        for b in range(self.blocks):
            count = int(self.counts[b])
            if not count:
                continue
            channel, y, x = self.taps[b, :count].T
            f0 = b * self.block
            local = channel - (f0 // group_out) * group_in
            dense[f0:f0 + self.block, local, y, x] = self.values[b, :count].T
        dense = dense[: self.out_channels]
        return dense[:, :, 0, 0] if self.gemm else dense


def pack_gathered(weight: np.ndarray, block: int, groups: int = 1) -> GatheredWeights:
    """Pack a masked weight (zeros = pruned) into :class:`GatheredWeights`.

    ``weight`` is a conv ``[F, C/groups, kh, kw]`` or a GEMM ``[M, K]`` (treated as
    ``[M, K, 1, 1]``). The kept taps of a block are the union over its filters of the
    nonzero ``(c, kh, kw)``. Every block must lie inside one group
    (``(F/groups) % block == 0`` when ``groups > 1``); ``F % block != 0`` is allowed
    with ``groups == 1`` (the last block is ragged: the GEMM case).
    """
    weight = np.asarray(weight, dtype=np.float32)
    gemm = weight.ndim == 2
    if gemm:
        weight = weight[:, :, None, None]
    if weight.ndim != 4:
        raise ValueError(f"weight of shape {weight.shape}: expected [F, C/groups, kh, kw] "
                         "or [M, K]")
    if block < 1:
        raise ValueError(f"block {block}: must be at least 1")
    filters, group_in, kh, kw = weight.shape
    if groups < 1 or filters % groups:
        raise ValueError(f"groups={groups} does not divide the {filters} output channels")
    group_out = filters // groups
    if groups > 1 and group_out % block:
        raise ValueError(f"block {block} does not divide the {group_out} output channels of "
                         f"each of the {groups} groups: a filter block must lie inside one "
                         "group")
    blocks = -(-filters // block)
    padded = np.zeros((blocks * block, group_in, kh, kw), np.float32)
    padded[:filters] = weight
    by_block = padded.reshape(blocks, block, group_in * kh * kw)
    kept = (by_block != 0).any(axis=1)  # [blocks, taps of one group]
    counts = kept.sum(axis=1).astype(np.int32)
    max_taps = max(int(counts.max(initial=0)), 1)
    values = np.zeros((blocks, max_taps, block), np.float32)
    taps = np.zeros((blocks, max_taps, 3), np.int32)
    for b in range(blocks):
        base = (b * block // group_out) * group_in  # the group's first input channel
        flat = np.flatnonzero(kept[b])
        channel, y, x = np.unravel_index(flat, (group_in, kh, kw))
        count = len(flat)
        taps[b, :count] = np.stack([channel + base, y, x], axis=1)
        taps[b, count:] = taps[b, 0] if count else (base, 0, 0)
        values[b, :count] = by_block[b][:, flat].T
    return GatheredWeights(values, taps, counts, filters, group_in * groups, (kh, kw),
                           groups, block, gemm)


# --- computes ---------------------------------------------------------------------------


def _flat_padded(data, padding: Sequence[int]):
    """``data`` ``[N, C/ib, H, W, ib]`` zero-padded with its (chunk, row, column) axes
    flattened: ``[N, C/ib * Hp * Wp, ib]``; returns it, an accessor taking a flat
    element offset within one image, and the (row, column) pitches in elements.

    The kernel addresses its input through one precomputed offset per tap (load it,
    add the pixel's offset, broadcast): a flat buffer keeps that address one add away
    from the tap load, where 5-D indexing costs a divide, a multiply and two adds per
    tap on the critical path (measured: 20-30% of the kernel's speed).
    """
    from tvm import te

    n, chunks, height, width, block = (int(v) for v in data.shape)
    top, left, bottom, right = (int(p) for p in padding)
    rows, cols = height + top + bottom, width + left + right

    def body(b, q, lane):
        chunk, y, x = q // (rows * cols), q // cols % rows - top, q % cols - left
        if not (top or left or bottom or right):
            return data[b, chunk, y, x, lane]
        inside = te.all(y >= 0, y < height, x >= 0, x < width)
        return te.if_then_else(inside, data[b, chunk, y, x, lane], 0.0)

    flat = te.compute((n, chunks * rows * cols, block), body, name=PAD_BLOCK)

    def at(b, offset):  # TVM folds the divide and modulo back into the flat address
        return flat[b, offset // block, offset % block]

    return at, (cols * block, block)


def sparse_conv2d_nchwc(data, values, taps, counts, strides: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], out_channels: int,
                        kernel_size: Sequence[int] | None = None):
    """Block-sparse convolution, ``NCHW{ib}c`` in, ``NCHW{bf}c`` out.

    ``data`` is ``[N, C/ib, H, W, ib]``; ``values``, ``taps``, ``counts`` are tensors of
    the shapes of :class:`GatheredWeights`' arrays (``bf`` = ``values.shape[2]``).
    ``padding`` is ``[top, left, bottom, right]``. ``kernel_size`` (``(kh, kw)`` of the
    layer, ``GatheredWeights.kernel_size``) is required: it gives the output size, and
    the taps are data, so it cannot be read from them. Output ``[N, F/bf, OH, OW, bf]``;
    requires ``F % bf == 0``. Any input block ``ib`` works (independent of ``bf``).
    """
    from tvm import te

    if kernel_size is None:
        raise ValueError("sparse_conv2d_nchwc: pass kernel_size=weights.kernel_size (the "
                         "taps are data, so the output size cannot be derived from them)")
    n, _, height, width, in_block = (int(v) for v in data.shape)
    blocks, max_taps, out_block = (int(v) for v in values.shape)
    if out_channels != blocks * out_block:
        raise ValueError(f"sparse_conv2d_nchwc: {out_channels} output channels in {blocks} "
                         f"blocks of {out_block}: the blocked output needs F % bf == 0")
    kh_size, kw_size = (int(k) for k in kernel_size)
    (sh, sw), (dh, dw) = (int(s) for s in strides), (int(d) for d in dilation)
    top, left, bottom, right = (int(p) for p in padding)
    out_h = _output_size(height, kh_size, sh, dh, top + bottom)
    out_w = _output_size(width, kw_size, sw, dw, left + right)
    flat_at, (row_pitch, col_pitch) = _flat_padded(data, padding)
    channel_pitch = row_pitch * (height + top + bottom)

    def offset(b, t):  # the tap's element offset in one padded image
        channel = taps[b, t, 0]
        return (channel // in_block * channel_pitch + taps[b, t, 1] * (dh * row_pitch)
                + taps[b, t, 2] * (dw * col_pitch) + channel % in_block)

    offsets = te.compute((blocks, max_taps), offset, name=OFFSET_BLOCK)
    t = te.reduce_axis((0, max_taps), name=TAP_AXIS)

    def body(b, oc, oh, ow, o):
        pixel = oh * (sh * row_pitch) + ow * (sw * col_pitch)
        term = values[oc, t, o] * flat_at(b, offsets[oc, t] + pixel)
        return te.sum(te.if_then_else(t < counts[oc], term, 0.0), axis=t)

    return te.compute((n, blocks, out_h, out_w, out_block), body, name=SPARSE_CONV_BLOCK)


def sparse_dense(data, values, taps, counts, out_features: int, chains: int = 1):
    """Block-sparse ``data @ W.T``: ``data`` ``[N, K]`` -> ``[N, M]``.

    ``taps`` is either ``[blocks, taps]`` int32 (the K index of each tap, see
    :meth:`GatheredWeights.gemm_taps`) or the ``[blocks, taps, 3]`` array of
    :func:`pack_gathered` (only its channel column is read). The last block may be
    ragged (``M % bf != 0``): the kernel accumulates whole blocks (``[N, blocks, bf]``,
    the ragged rows have zero weights) and a last stage writes the ``M`` real outputs,
    so the inner loop is never predicated.

    ``chains > 1`` (few rows, so few accumulators): tap ``t * chains + u`` adds to
    partial sum ``u``, summed by the last stage, so ``chains`` FMAs are in flight where
    one accumulator would wait out each FMA's latency (an FC layer at batch 1 has one
    vector per block). The taps are then read in whole chains: ``max_taps`` must be a
    multiple of ``chains``, the padding taps zero.
    """
    from tvm import te

    n, _ = (int(v) for v in data.shape)
    blocks, max_taps, out_block = (int(v) for v in values.shape)
    if not (blocks - 1) * out_block < out_features <= blocks * out_block:
        raise ValueError(f"sparse_dense: {out_features} outputs do not fit {blocks} blocks "
                         f"of {out_block}")
    three = len(taps.shape) == 3
    if max_taps % chains:
        raise ValueError(f"sparse_dense: {max_taps} taps are not whole chains of {chains}")
    t = te.reduce_axis((0, max_taps // chains), name=TAP_AXIS)

    def body(i, b, u, o):  # partial sum u: taps t * chains + u
        tap = t * chains + u if chains > 1 else t
        k = taps[b, tap, 0] if three else taps[b, tap]
        bound = counts[b] if chains == 1 else (counts[b] + (chains - 1)) // chains
        return te.sum(te.if_then_else(t < bound, values[b, tap, o] * data[i, k], 0.0), axis=t)

    if chains == 1:
        rows = te.compute((n, blocks, out_block), lambda i, b, o: body(i, b, 0, o),
                          name=SPARSE_DENSE_BLOCK)
        return te.compute((n, out_features),
                          lambda i, m: rows[i, m // out_block, m % out_block],
                          name=DENSE_ROWS_BLOCK)
    partial = te.compute((n, blocks, chains, out_block), body, name=SPARSE_DENSE_BLOCK)
    return te.compute((n, out_features),
                      lambda i, m: sum_partials(partial, i, [m], chains, out_block),
                      name=DENSE_ROWS_BLOCK)


def sum_partials(partial, i, rows, chains: int, out_block: int):
    """The sum over ``rows`` (flat row indices of ``partial [N, blocks, chains, bf]``)
    and chains: the last stage of :func:`sparse_dense` and its phase-plane form."""
    terms = [partial[i, row // out_block, u, row % out_block]
             for row in rows for u in range(chains)]
    result = terms[0]
    for term in terms[1:]:
        result = result + term
    return result


def pad_to_chains(values: np.ndarray, taps: np.ndarray, chains: int):
    """``values [blocks, taps, bf]`` and ``taps [blocks, taps(, 3)]`` with zero taps
    appended up to whole chains (:func:`sparse_dense`)."""
    extra = -values.shape[1] % chains
    if not extra:
        return values, taps
    pad = lambda a: np.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    return pad(values), pad(taps)


def dense_chains(rows: int, block: int, lanes: int) -> int:
    """Partial sums per block for :func:`sparse_dense` on a CPU: 2 where a register tile
    has a single accumulator (one row, a one-vector block), else 1. Each tap loads its
    weight vector and broadcasts an input, so the loop runs at about one FMA a cycle:
    two chains hide the FMA latency. FC 1024->1000 pruned 3x in 16 x 1 blocks at batch
    1 (AVX-512, 1 thread): 0.016 ms against 0.025 with one accumulator; 4 and 8 chains
    were no faster (their padding taps and epilogue cost more)."""
    return 2 if rows * -(-block // lanes) == 1 else 1


# --- schedules --------------------------------------------------------------------------


def pixel_tile(width: int, block: int, cfg: CpuScheduleConfig) -> int:
    """Output columns per register tile: the largest divisor of ``width`` whose
    ``tile x ceil(block / lanes)`` accumulators, one weight vector per lane group and a
    broadcast fit the registers and ``max_local_bytes``."""
    vectors = -(-block // cfg.lanes)
    cap = cfg.sparse_pixel_tile or cfg.vector_registers
    best = 1
    for tile in range(1, min(width, cap) + 1):
        if width % tile:
            continue
        if tile * vectors + vectors + 1 > cfg.vector_registers:
            continue
        if tile * block * 4 > cfg.max_local_bytes:
            continue
        best = tile
    return best


def _finish_tile(sch, out_block, at_loop) -> None:
    """The epilogue at the register tile: the tile's loops unrolled, the innermost
    (the filters of a block) vectorized."""
    from tir_schedules.common import same

    sch.reverse_compute_at(out_block, at_loop)
    loops = sch.get_loops(out_block)
    depth = [i for i, loop in enumerate(loops) if same(sch, loop, at_loop)][0] + 1
    tile_loops = loops[depth:]
    for loop in tile_loops[:-1]:
        sch.unroll(loop)
    if tile_loops:
        sch.vectorize(tile_loops[-1])


def _schedule_producers(sch, pad, offsets, cfg: CpuScheduleConfig) -> None:
    """The flat padded input and the tap offsets, at the root, once per call (the taps
    are data, so no loop nest can say which part of the input one iteration reads):
    the copy vectorized along the input channel block and parallel when big, the
    offsets (one int per tap) serial."""
    n, outer, lane = sch.get_loops(pad)
    sch.vectorize(lane)
    fused = sch.fuse(n, outer)
    if math.prod(loop_extents(sch, pad)) >= cfg.parallel_min_flops // 4:
        sch.parallel(fused)
    sch.fuse(*sch.get_loops(offsets))


def schedule_sparse_conv2d_nchwc(sch, cfg: CpuScheduleConfig) -> None:
    """Register-tiled, vectorized, parallel schedule of a (fused) sparse conv kernel.

    Loop nest: parallel over (image, output row, filter block) -> output-column tile
    -> taps of the block (bounded by its count) -> column tile (unrolled) -> the ``bf``
    filters (vector). ``cfg.sparse_parallel`` picks another parallel order ("rows":
    blocks inside the parallel loop; "blocks": (image, block, row)). The flat padded
    input and the tap offsets are built first, at the root.
    """
    conv = find_block(sch, SPARSE_CONV_BLOCK)
    pad = find_block(sch, PAD_BLOCK)
    offsets = find_block(sch, OFFSET_BLOCK)
    n, oc, oh, ow, ob, tap = sch.get_loops(conv)
    _, blocks, out_h, out_w, block, max_taps = loop_extents(sch, conv)
    w_tile = pixel_tile(out_w, block, cfg)
    out = fuse_epilogue(sch, conv, producers=[pad, offsets])
    sch.set_scope(conv, 0, cfg.sparse_accumulator_scope)
    ow_o, ow_i = sch.split(ow, [None, w_tile])
    mode = cfg.sparse_parallel
    if mode == "auto":  # small maps: many weights per pixel, keep a block's in cache
        mode = "blocks" if out_h * out_w <= SMALL_MAP else "rows_blocks"
    order = {"rows_blocks": ([n, oh, oc], []), "rows": ([n, oh], [oc]),
             "blocks": ([n, oc, oh], [])}[mode]
    sch.reorder(*order[0], *order[1], ow_o, tap, ow_i, ob)
    outer = sch.fuse(*order[0])
    tile_at = ow_o
    _finish_tile(sch, out, tile_at)
    _schedule_producers(sch, pad, offsets, cfg)
    flops = 2 * blocks * out_h * out_w * block * max_taps
    if flops >= cfg.parallel_min_flops:
        sch.parallel(outer)
    sch.unroll(ow_i)
    sch.vectorize(ob)
    sch.decompose_reduction(conv, tap)


def schedule_sparse_dense(sch, cfg: CpuScheduleConfig) -> None:
    """Parallel over (row tile, filter block) -> taps of the block (bounded by its count)
    -> rows of the tile (unrolled) -> the ``bf`` outputs of the block (vector); the
    epilogue writes the block's outputs (the last, ragged block's real ones)."""
    dense = find_block(sch, SPARSE_DENSE_BLOCK)
    loops = sch.get_loops(dense)
    i, b, *chain, o, tap = loops  # chain: the partial sums of sparse_dense(chains > 1)
    rows, blocks, *chains, block, max_taps = loop_extents(sch, dense)
    work = 2 * rows * blocks * block * max_taps * (chains[0] if chains else 1)
    out = fuse_epilogue(sch, dense)
    r_tile = pixel_tile(rows, block, cfg)
    i_o, i_i = sch.split(i, [None, r_tile])
    sch.reorder(i_o, b, tap, i_i, *chain, o)
    outer = sch.fuse(i_o, b)
    if chain:  # the partial sums leave the tile; the epilogue adds them up on its own
        from tir_schedules.sparse_csr import unroll_tile

        sch.set_scope(dense, 0, "global")
        acc = sch.cache_write(dense, 0, cfg.sparse_accumulator_scope)
        sch.reverse_compute_at(acc, outer)
        unroll_tile(sch, acc, cfg.lanes, at=outer)
        vectorize_flat(sch, out, cfg.lanes)
    else:
        sch.set_scope(dense, 0, cfg.sparse_accumulator_scope)
        _finish_tile(sch, out, outer)
    if work >= cfg.parallel_min_flops:
        sch.parallel(outer)
    for loop in (i_i, *chain):
        sch.unroll(loop)
    sch.vectorize(o)
    sch.decompose_reduction(dense, tap)


# --- the data-dependent tap bound --------------------------------------------------------


def _is_tap_guard(expr) -> bool:
    """Whether ``expr`` is the compute's ``if_then_else(tap < counts[b], x, 0)`` (the
    count maybe times 0/1 factors of the pixel tile, or rounded up to whole chains)."""
    import tvm

    if not (isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name in ("prim.if_then_else", "tirx.if_then_else")
            and isinstance(expr.args[0], tvm.prim.LT)):
        return False
    bound = expr.args[0].b
    while isinstance(bound, (tvm.prim.Cast, tvm.prim.Mul, tvm.prim.FloorDiv, tvm.prim.Add)):
        # a count, maybe times 0/1 factors, or rounded up to whole chains
        bound = bound.value if isinstance(bound, tvm.prim.Cast) else bound.a
    return (isinstance(bound, tvm.ir.TensorLoad) and len(bound.indices) == 1
            and "int" in str(bound.ty))


def _substitute(expr, mapping: dict):
    import tvm_ffi
    from tvm import tirx

    def mutate(node, mutator):
        for var, value in mapping.items():
            if node.same_as(var):
                return value
        return node

    return tvm_ffi.structural_mutate(expr, [(tirx.Var, mutate)])


def bound_tap_loops(func):
    """Stop each block's tap loop at ``counts[b]`` instead of the padded maximum.

    The computes guard every tap with ``tap < counts[b]``; in a scheduled kernel (tap
    loop outside the pixel tile and the filter vector, as the templates here place it)
    this turns the guard into the loop's bound, ``for tap in range(counts[b])``, and
    drops it from the body: padded taps then cost neither FMAs nor branches. A function
    without a sparse block, or whose tap loop is split, unrolled, vectorized, parallel or
    encloses the block loop (a schedule these templates do not make), is returned
    unchanged: still correct, the guard stays.
    """
    import tvm
    import tvm_ffi
    from tvm import tirx

    found = []  # (realize, guard) of the reduction blocks that carry the tap guard

    def find(node, visitor):
        guards = []

        def find_guard(call, inner):
            if _is_tap_guard(call):
                guards.append(call)
            inner.default_visit(call)

        name = node.block.name_hint
        if name.startswith((SPARSE_CONV_BLOCK, SPARSE_DENSE_BLOCK)):
            tvm_ffi.structural_visit(node.block.body, [(tvm.ir.Call, find_guard)])
            if guards:
                found.append((node, guards[0]))
        visitor.default_visit(node)

    tvm_ffi.structural_visit(func.body, [(tvm.s_tir.SBlockRealize, find)])
    if len(found) != 1:
        return func
    realize, guard = found[0]
    condition = guard.args[0]
    bindings = {iv.var: value for iv, value in zip(realize.block.iter_vars,
                                                   realize.iter_values)}
    tap_loop_var = _substitute(condition.a, bindings)
    if not isinstance(tap_loop_var, tirx.Var):
        return func
    bound = _substitute(condition.b, bindings)
    state = {"inside": []}

    def collect_inner(node, visitor):  # loops nested in the tap loop: bound their vars
        state["inside"].append(node)
        visitor.default_visit(node)

    def mutate_for(node, mutator):
        if not node.loop_var.same_as(tap_loop_var):
            return mutator.default_mutate(node)
        tvm_ffi.structural_visit(node.body, [(tirx.For, collect_inner)])
        analyzer = tvm.sym.Analyzer()
        for loop in state["inside"]:
            analyzer.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
        extent = analyzer.simplify(bound)
        starts_at_zero = isinstance(node.min, tvm.prim.IntImm) and int(node.min) == 0
        if (node.kind != tirx.ForKind.SERIAL or not starts_at_zero
                or not _only_block(node.body, realize.block)
                or any(_uses(extent, loop.loop_var) for loop in state["inside"])):
            return node
        state["done"] = True
        body = tvm_ffi.structural_mutate(node.body, [(tvm.ir.Call, drop_guard)])
        dtype = str(node.loop_var.ty)
        extent = tvm.prim.Min(tirx.Cast(dtype, extent), node.extent)  # never past the padding
        return tirx.For(node.loop_var, node.min, extent, node.kind, body,
                        node.thread_binding, node.annotations)

    def drop_guard(node, mutator):
        node = mutator.default_mutate(node)
        return node.args[1] if _is_tap_guard(node) else node

    body = tvm_ffi.structural_mutate(func.body, [(tirx.For, mutate_for)])
    return func.with_body(body) if state.get("done") else func


def _only_block(stmt, block) -> bool:
    """Whether ``block`` is the only block under ``stmt`` (so bounding the loop skips
    nothing else)."""
    import tvm
    import tvm_ffi

    others = []

    def visit(node, visitor):
        others.append(not node.block.same_as(block))
        visitor.default_visit(node)

    tvm_ffi.structural_visit(stmt, [(tvm.s_tir.SBlockRealize, visit)])
    return not any(others)


def _uses(expr, var) -> bool:
    import tvm_ffi
    from tvm import tirx

    hits = []

    def visit(node, visitor):
        hits.append(node.same_as(var))

    tvm_ffi.structural_visit(expr, [(tirx.Var, visit)])
    return any(hits)


# --- reference ---------------------------------------------------------------------------


def reference_conv2d(data_nchw: np.ndarray, weight: np.ndarray, strides: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int],
                     groups: int = 1) -> np.ndarray:
    """Plain numpy NCHW convolution (float64 accumulation); ``padding`` is
    ``[top, left, bottom, right]`` and ``weight`` ``[F, C/groups, kh, kw]``."""
    data = np.asarray(data_nchw, np.float64)
    weight = np.asarray(weight, np.float64)
    n, channels, _, _ = data.shape
    filters, group_in, kh, kw = weight.shape
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    data = np.pad(data, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (data.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (data.shape[3] - (kw - 1) * dw - 1) // sw + 1
    group_out = filters // groups
    out = np.zeros((n, filters, out_h, out_w))
    for g in range(groups):
        x = data[:, g * group_in:(g + 1) * group_in]
        wg = weight[g * group_out:(g + 1) * group_out]
        for y in range(kh):
            for z in range(kw):
                window = x[:, :, y * dh:y * dh + (out_h - 1) * sh + 1:sh,
                           z * dw:z * dw + (out_w - 1) * sw + 1:sw]
                out[:, g * group_out:(g + 1) * group_out] += np.einsum(
                    "nchw,fc->nfhw", window, wg[:, :, y, z])
    assert channels == group_in * groups
    return out.astype(np.float32)
