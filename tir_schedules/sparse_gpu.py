"""OpenCL (Mali, Adreno) schedules of the gathered-tap sparse kernels.

The math is :mod:`tir_schedules.sparse_conv`'s (the same TE computes, packed format and
fused epilogues); only the schedule differs. One work-item computes ``vector`` output
channels of one block (a ``float4`` along the block's filters) at one output pixel, and
walks the block's taps: per tap one input value (shared by the ``vector`` filters) and one
``float4`` of weights. A work-group holds the pixels of one output row (split to fit the
device's work-group limit) times the block's vectors; work-groups cover (image, filter
block, row). The zero-padding and tap-offset stages are inlined into the kernel, so one
launch does the whole layer. Tap loops stop at each block's count, as on the CPU.
"""

from __future__ import annotations

from tir_schedules.common import find_block
from tir_schedules.sparse_conv import (SPARSE_CONV_BLOCK, SPARSE_DENSE_BLOCK,
                                       bound_tap_loops)

VECTOR = 4  # float4: what Mali and Adreno load and compute in one instruction


def _inline_around(sch, main) -> object:
    """Inline every stage before ``main`` (padding, tap offsets) and all epilogue
    stages but the last, which is returned (or None if ``main`` writes the output)."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(sch.get(main).name_hint)
    for block in blocks[:position]:
        sch.compute_inline(block)
    after = blocks[position + 1:]
    for block in after[:-1]:
        sch.compute_inline(block)
    return after[-1] if after else None


def _vector(extent: int) -> int:
    return VECTOR if extent % VECTOR == 0 else 1


def _map_threads(sch, main, out, spatial: list, lanes, tap, max_threads: int,
                 whole_block: bool = False) -> None:
    """Work-items over (last spatial loop, vectors of ``lanes``), work-groups over the
    other spatial loops and the rest of the last; per work-item the taps run outside
    its vector of outputs, whose accumulators stay in registers. ``whole_block`` gives a
    work-item all of ``lanes`` (an epilogue that reindexes the block, as the ragged GEMM
    output does, then reads only that work-item's accumulators)."""
    extent = int(sch.get(lanes).extent)
    vector = extent if whole_block else _vector(extent)
    vec_o, vec_i = sch.split(lanes, [None, vector])
    inner = int(sch.get(spatial[-1]).extent)
    per_group = max(1, min(inner, max_threads // (extent // vector)))
    inner_o, inner_i = sch.split(spatial[-1], [None, per_group])
    sch.reorder(*spatial[:-1], inner_o, inner_i, vec_o, tap, vec_i)
    sch.bind(sch.fuse(*spatial[:-1], inner_o), "blockIdx.x")
    thread = sch.fuse(inner_i, vec_o)
    sch.bind(thread, "threadIdx.x")
    sch.unroll(vec_i)
    try:  # the epilogue reads the accumulators straight from registers
        if out is None:
            raise ValueError("no epilogue")
        sch.reverse_compute_at(out, thread)
        sch.set_scope(main, 0, "local")
    except Exception:  # accumulate in registers, store; the epilogue is its own loop
        sch.reverse_compute_at(sch.cache_write(main, 0, "local"), thread)
        if out is not None:
            _bind_elementwise(sch, out, max_threads)
    sch.decompose_reduction(main, tap)


def _bind_elementwise(sch, block, max_threads: int) -> None:
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    outer, inner = sch.split(fused, [None, min(extent, max_threads)])
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.x")


def schedule_sparse_conv2d_gpu(sch, max_threads: int = 256) -> None:
    """Work-groups over (image, filter block, row, pixel chunk); work-items over
    (pixel, float4 of the block's filters); taps serial per work-item."""
    conv = find_block(sch, SPARSE_CONV_BLOCK)
    out = _inline_around(sch, conv)
    n, oc, oh, ow, o, tap = sch.get_loops(conv)
    _map_threads(sch, conv, out, [n, oc, oh, ow], o, tap, max_threads)


def schedule_sparse_dense_gpu(sch, max_threads: int = 256) -> None:
    """Work-groups over (row, filter blocks); work-items over (block, float4 of its
    filters), or over whole blocks when the last block is ragged (its outputs are
    written by the epilogue, which then reads one work-item's accumulators)."""
    dense = find_block(sch, SPARSE_DENSE_BLOCK)
    out = _inline_around(sch, dense)
    *spatial, lanes, tap = sch.get_loops(dense)
    blocks, block = (int(sch.get(loop).extent) for loop in (spatial[-1], lanes))
    ragged = out is not None and int(sch.get(sch.get_loops(out)[-1]).extent) != blocks * block
    _map_threads(sch, dense, out, spatial, lanes, tap, max_threads, whole_block=ragged)


def _bind_flat(sch, loops, max_threads: int):
    fused = sch.fuse(*loops)
    extent = int(sch.get(fused).extent)
    threads = max(1, min(max_threads, 64, extent))
    outer, inner = sch.split(fused, [None, threads])
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.x")
    return inner


def schedule_pixel_sparse_gpu(sch, max_threads: int = 256) -> None:
    """The pixel-vectorized kernels (pattern, row-sparse): one work-item per output
    element of the blocked output (with the fused epilogue), which computes its
    reduction serially (pattern and entry loops unrolled) in a register; the padding
    and offset stages are inlined, so one launch does the layer. The tap loops run to
    the padded maximum (see :func:`schedule_sparse_gpu`)."""
    from tir_schedules.sparse_csr import PIXEL_PAD_BLOCK, ROWS_CONV_BLOCK, ROWS_OFFSET_BLOCK
    from tir_schedules.sparse_pattern import PATTERN_CONV_BLOCK

    for prefix in (PIXEL_PAD_BLOCK, ROWS_OFFSET_BLOCK):
        block = find_block(sch, prefix)
        if block is not None:
            sch.compute_inline(block)
    main = find_block(sch, PATTERN_CONV_BLOCK) or find_block(sch, ROWS_CONV_BLOCK)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(main).name_hint) + 1:]
    for block in after[:-1]:
        sch.compute_inline(block)
    thread = _bind_flat(sch, sch.get_loops(after[-1]), max_threads)
    sch.set_scope(main, 0, "local")
    sch.compute_at(main, thread)
    if sch.get(main).name_hint.startswith(PATTERN_CONV_BLOCK):
        pattern, _, entry = sch.get_loops(main)[-3:]
        sch.unroll(pattern)
        sch.unroll(entry)


def schedule_sparse_gpu(func, max_threads: int = 256):
    """``func`` scheduled for an OpenCL device if it is a sparse kernel, else None."""
    import tvm

    from tir_schedules import kernel_family

    try:
        family = kernel_family(func)
    except Exception:  # no root block: not ours
        return None
    templates = {"sparse_conv2d": schedule_sparse_conv2d_gpu,
                 "sparse_dense": schedule_sparse_dense_gpu,
                 "sparse_pattern": schedule_pixel_sparse_gpu,
                 "sparse_rows": schedule_pixel_sparse_gpu}
    if family not in templates:
        return None
    sch = tvm.s_tir.Schedule(func)
    templates[family](sch, max_threads)
    if templates[family] is schedule_pixel_sparse_gpu:
        # the reduction's init stays in the block (decompose_reduction refuses a block
        # computed at a work-item), so its loops keep their full extent: the guard
        # makes the padded kernels add zeros
        return sch.mod["main"]
    return bound_tap_loops(sch.mod["main"])
