"""Schedule helpers shared by the op families: epilogue fusion and register tiles."""

from __future__ import annotations

import math


def block_name(sch, block) -> str:
    return sch.get(block).name_hint


def find_block(sch, prefix: str):
    """The first block of the function whose name starts with ``prefix`` (or None)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if block_name(sch, block).startswith(prefix):
            return block
    return None


def same(sch, a, b) -> bool:
    """Whether two block or loop handles of ``sch`` name the same statement."""
    return sch.get(a).same_as(sch.get(b))


def loop_extents(sch, block) -> list[int]:
    return [int(sch.get(loop).extent) for loop in sch.get_loops(block)]


def vectorize_flat(sch, block, lanes: int) -> None:
    """``block``'s loops fused and vectorized by the widest power of two up to ``lanes``
    that divides them."""
    flat = sch.fuse(*sch.get_loops(block))
    extent = int(sch.get(flat).extent)
    width = max(w for w in (1, 2, 4, 8, 16, 32, 64) if w <= lanes and extent % w == 0)
    _, inner = sch.split(flat, [None, width])
    sch.vectorize(inner)


PARALLEL_ATTR = "npas_parallel"  # a loop for parallel_marked_loops to make parallel


def parallel_marked_loops(func):
    """``func`` with the loops a schedule annotated :data:`PARALLEL_ATTR` made parallel.

    For hand-written kernels whose opaque blocks read and write their own accumulators:
    the schedule primitive refuses them (it checks the blocks under the loop), though
    each iteration owns its accumulators and its share of the output."""
    import tvm_ffi
    from tvm import tirx

    def mutate_for(node, mutator):
        node = mutator.default_mutate(node)
        if PARALLEL_ATTR not in node.annotations:
            return node
        annotations = {k: v for k, v in node.annotations.items() if k != PARALLEL_ATTR}
        return tirx.For(node.loop_var, node.min, node.extent, tirx.ForKind.PARALLEL,
                        node.body, node.thread_binding, annotations)

    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, mutate_for)]))


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1): a split
    factor that needs no predicate."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def fuse_epilogue(sch, main_block, producers=()):
    """Collapse the blocks after ``main_block`` into one block that writes the output.

    A fused kernel is ``main -> bias add -> clip -> residual add``; the intermediate
    elementwise blocks are inlined into the last one, which the caller places at the
    register tile (``reverse_compute_at``) so the accumulators go straight from
    registers through the epilogue to memory. Without an epilogue a ``local`` cache
    write plays its part. Returns that block, or raises if a block is not elementwise.
    """
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    position = [i for i, b in enumerate(blocks) if same(sch, b, main_block)][0]
    before = [b for b in blocks[:position] if not any(same(sch, b, p) for p in producers)]
    for block in before:  # stray injective producers (e.g. a fused reshape)
        sch.compute_inline(block)
    after = blocks[position + 1:]
    if not after:
        return sch.cache_write(main_block, 0, "local")
    for block in after[:-1]:
        sch.compute_inline(block)
    sch.set_scope(main_block, 0, "local")
    return after[-1]


def choose_register_tile(channel_blocks: int, width: int, registers: int,
                         max_channel_tile: int, max_width_tile: int,
                         max_accumulators: int | None = None) -> tuple[int, int]:
    """(output-channel blocks, output columns) per register tile of a blocked conv.

    Minimizes loads per FMA, ``(c + w) / (c * w)``, over tiles whose accumulators,
    weight vectors and one broadcast fit the vector registers, with ``c`` dividing
    the channel blocks and ``w`` the width (a ragged tile adds predicates that keep
    the accumulators out of registers). ``max_accumulators`` caps ``c * w``.
    """
    cap = max_accumulators or registers
    best, best_cost = (1, 1), math.inf
    for c in range(1, max_channel_tile + 1):
        if channel_blocks % c:
            continue
        for w in range(1, min(max_width_tile, width) + 1):
            if width % w or c * w + c + 1 > registers or c * w > cap:
                continue
            cost = (c + w) / (c * w)
            if cost < best_cost - 1e-9:
                best, best_cost = (c, w), cost
    return best


def vector_tile(extent: int, lanes: int, max_vectors: int = 4) -> int:
    """The largest multiple of ``lanes`` dividing ``extent``, at most ``max_vectors`` vectors."""
    for vectors in range(max_vectors, 0, -1):
        if extent % (lanes * vectors) == 0:
            return lanes * vectors
    return 0
