"""Schedules for the kernels around the convolutions: elementwise, layout, pool, dense.

Two templates cover them: an injective one (everything elementwise: layout transforms,
stand-alone activations, the squeeze-excite multiply) and a single-reduction one
(pools, global average pool, matmul/dense, each with its fused epilogue). Both vectorize
the innermost output axis along the target's SIMD width when it divides it and go
parallel only above :attr:`CpuScheduleConfig.parallel_min_flops` work, since a small
kernel loses more to the thread pool's fork-join than it gains.
"""

from __future__ import annotations

import math

from tir_schedules.common import loop_extents, vector_tile
from tir_schedules.config import CpuScheduleConfig

_REDUCE = 2  # tirx.IterVar.CommReduce


def _is_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) == _REDUCE for iv in sch.get(block).iter_vars)


def _vector_width(extent: int, lanes: int) -> int:
    """A vector tile for ``extent``: full SIMD vectors, else half-width ones, else 0."""
    width = lanes
    while width >= 4:
        tile = vector_tile(extent, width)
        if tile:
            return tile
        width //= 2
    return 0


def _inline_all(sch, blocks) -> list:
    """Inline what can be inlined; return the blocks that remain."""
    remaining = []
    for block in blocks:
        try:
            sch.compute_inline(block)
        except Exception:  # an output block, or one read with a different pattern
            remaining.append(block)
    return remaining


def schedule_injective(sch, cfg: CpuScheduleConfig) -> None:
    """Every block spatial: inline the intermediates, vectorize, parallelize the rest."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    for block in _inline_all(sch, blocks[:-1]) + blocks[-1:]:
        loops = sch.get_loops(block)
        if not loops:
            continue
        extents = loop_extents(sch, block)
        width = _vector_width(extents[-1], cfg.lanes)
        outer = list(loops)
        if width:
            outer[-1], inner = sch.split(loops[-1], [None, width])
            sch.vectorize(inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if math.prod(extents) >= cfg.parallel_min_flops // 4:
            sch.parallel(fused)


def schedule_reduction(sch, cfg: CpuScheduleConfig) -> None:
    """One reduction block (pool, mean, matmul) plus producers and an epilogue.

    Parallel over the outer output axes -> reduction loops -> a vector tile of the
    innermost output axis, accumulated in registers (a ``local`` cache) and written
    through the epilogue.
    """
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        raise ValueError("expected exactly one reduction block")
    red = reductions[0]
    position = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(red))][0]
    for block in blocks[:position]:
        sch.compute_inline(block)  # padding of a pool, a transposed weight view
    epilogue = blocks[position + 1:]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    iters = sch.get(red).iter_vars
    loops = sch.get_loops(red)
    spatial = [l for l, iv in zip(loops, iters) if int(iv.iter_type) != _REDUCE]
    reduce = [l for l, iv in zip(loops, iters) if int(iv.iter_type) == _REDUCE]
    extents = loop_extents(sch, red)
    spatial_extents = [e for e, iv in zip(extents, iters) if int(iv.iter_type) != _REDUCE]
    width = _vector_width(spatial_extents[-1], cfg.lanes) if spatial else 0
    work = 2 * math.prod(extents)
    if width:
        outer_last, inner = sch.split(spatial[-1], [None, width])
        sch.reorder(*spatial[:-1], outer_last, *reduce, inner)
        outer = [*spatial[:-1], outer_last]
        tile_at = outer_last
    else:
        sch.reorder(*spatial, *reduce)
        outer, inner, tile_at = spatial, None, None
    fused = sch.fuse(*outer) if len(outer) > 1 else (outer[0] if outer else None)
    if tile_at is not None:
        tile_at = fused
        if epilogue:
            sch.set_scope(red, 0, "local")
            out = epilogue[-1]
        else:
            out = sch.cache_write(red, 0, "local")
        depth = 1 + [i for i, l in enumerate(sch.get_loops(red))
                     if sch.get(l).same_as(sch.get(fused))][0]
        sch.reverse_compute_at(out, tile_at)
        tile = sch.get_loops(out)[depth:]
        for loop in tile[:-1]:
            sch.unroll(loop)
        sch.vectorize(tile[-1])
    if fused is not None and work >= cfg.parallel_min_flops:
        sch.parallel(fused)
    if inner is not None:
        sch.vectorize(inner)
    if reduce:
        sch.decompose_reduction(red, reduce[0])
