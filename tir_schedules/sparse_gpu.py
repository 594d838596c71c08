"""OpenCL (Mali, Adreno) schedules of the gathered-tap sparse kernels.

The math is :mod:`tir_schedules.sparse_conv`'s (the same TE computes, packed format and
fused epilogues); only the schedule differs. One work-item computes ``vector`` output
channels of one block (a ``float4`` along the block's filters) at one output pixel, and
walks the block's taps: per tap one input value (shared by the ``vector`` filters) and one
``float4`` of weights. A work-group holds the pixels of one output row (split to fit the
device's work-group limit) times the block's vectors; work-groups cover (image, filter
block, row). The zero-padding and tap-offset stages are inlined into the kernel, so one
launch does the whole layer. Tap loops stop at each block's count, as on the CPU.

Input staging (``GpuScheduleConfig.stage_input``). The work-items of a group share the
block, so at each tap the ``float4``s of one pixel read the same input value, and each
computes its address (tap index, offset, padding test). Staged, the taps run in chunks
of ``stage_taps``: per chunk the group gathers the chunk's values for its pixels
(``pixels x stage_taps`` floats, at most 4 KiB) into ``__local`` memory, one load per
value spread over the work-items, then, after a barrier, every work-item reads its
pixel's values from there. The chunk loop stops at ``ceil(count / stage_taps)``, the
same for the whole group (one block per group), so all its work-items meet the same
barriers. Default (:func:`stage_input_pays`): staged on Adreno for convs that zero-pad
their input (the KxK convs), where an H100 measured 1.4-3.2x; not for 1x1 convs, not on
Mali, and never for the GEMM (``sparse_dense``: its groups hold several blocks with
different taps, and TVM cannot bound a data-dependent gather region for a whole-row
copy). The pixel-vectorized kernels (pattern, unstructured) are not staged: their
groups span several filters with different taps, whose common tile would be every
input channel of the pixel window.
"""

from __future__ import annotations

from dataclasses import dataclass

from tir_schedules.common import find_block, same
from tir_schedules.sparse_conv import (SPARSE_CONV_BLOCK, SPARSE_DENSE_BLOCK,
                                       bound_tap_loops)

VECTOR = 4  # float4: what Mali and Adreno load and compute in one instruction


@dataclass(frozen=True)
class GpuScheduleConfig:
    """Knobs of the OpenCL sparse schedules.

    ``stage_input``: stage the work-group's input tile in ``__local`` memory (see
    :func:`stage_input_pays`): ``"auto"`` applies the rule, ``True`` / ``False`` force it.
    ``stage_taps``: taps per staged chunk of the conv kernel (the chunk's gathered
    input, pixels x taps floats, is what the work-group holds in local memory).
    ``max_local_bytes``: the most local memory a staged tile may take (the dense
    kernel's staged row; OpenCL guarantees 32 KiB, Mali and Adreno have 32 KiB).
    """

    max_threads: int = 256
    device: str = "mali"  # "mali" or "adreno"
    stage_input: bool | str = "auto"
    stage_taps: int = 16
    max_local_bytes: int = 16 * 1024


def _inline_around(sch, main, keep=None) -> object:
    """Inline every stage before ``main`` (padding, tap offsets) but ``keep`` (a
    staged tile) and all epilogue stages but the last, which is returned (or None if
    ``main`` writes the output)."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(sch.get(main).name_hint)
    kept = sch.get(keep).name_hint if keep is not None else None
    for block in blocks[:position]:
        if sch.get(block).name_hint != kept:
            sch.compute_inline(block)
    after = blocks[position + 1:]
    for block in after[:-1]:
        sch.compute_inline(block)
    return after[-1] if after else None


def _vector(extent: int) -> int:
    return VECTOR if extent % VECTOR == 0 else 1


def _map_threads(sch, main, out, spatial: list, lanes, tap, max_threads: int,
                 whole_block: bool = False):
    """Work-items over (last spatial loop, vectors of ``lanes``), work-groups over the
    other spatial loops and the rest of the last; per work-item the taps run outside
    its vector of outputs, whose accumulators stay in registers. ``whole_block`` gives a
    work-item all of ``lanes`` (an epilogue that reindexes the block, as the ragged GEMM
    output does, then reads only that work-item's accumulators). Returns the
    work-group and work-item loops."""
    extent = int(sch.get(lanes).extent)
    vector = extent if whole_block else _vector(extent)
    vec_o, vec_i = sch.split(lanes, [None, vector])
    per_group = _per_group(extent, int(sch.get(spatial[-1]).extent), max_threads,
                           whole_block)
    inner_o, inner_i = sch.split(spatial[-1], [None, per_group])
    sch.reorder(*spatial[:-1], inner_o, inner_i, vec_o, tap, vec_i)
    group = sch.fuse(*spatial[:-1], inner_o)
    sch.bind(group, "blockIdx.x")
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
    return group, thread


def _map_threads_staged(sch, main, out, spatial: list, lanes, tap, max_threads: int,
                        chunk: int):
    """:func:`_map_threads` with the taps in chunks of ``chunk`` and the chunk loop
    outside the work-items: per work-group, for each chunk, the work-items load the
    chunk's tile, then each accumulates its outputs over the chunk (the accumulators
    stay in registers across the chunks). Returns (work-group loop, work-items, chunk
    loop)."""
    extent = int(sch.get(lanes).extent)
    vector = _vector(extent)
    vec_o, vec_i = sch.split(lanes, [None, vector])
    per_group = _per_group(extent, int(sch.get(spatial[-1]).extent), max_threads, False)
    inner_o, inner_i = sch.split(spatial[-1], [None, per_group])
    tap_chunk, tap_i = sch.split(tap, [None, chunk])
    sch.reorder(*spatial[:-1], inner_o, tap_chunk, inner_i, vec_o, tap_i, vec_i)
    group = sch.fuse(*spatial[:-1], inner_o)
    sch.bind(group, "blockIdx.x")
    thread = sch.fuse(inner_i, vec_o)
    sch.bind(thread, "threadIdx.x")
    threads = int(sch.get(thread).extent)
    sch.unroll(vec_i)
    if out is not None:
        sch.set_scope(main, 0, "local")
        store = out
        sch.reverse_compute_at(out, group)
    else:
        store = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(store, group)
    *pixels, filters = sch.get_loops(store)[1:]
    f_o, f_i = sch.split(filters, [None, vector])
    sch.bind(sch.fuse(*pixels, f_o), "threadIdx.x")
    sch.unroll(f_i)
    sch.decompose_reduction(main, tap_chunk)
    return group, threads, tap_chunk


def _cooperative(sch, block, at, threads: int, swap: bool = False) -> None:
    """``block`` (a ``shared``-scope copy) computed at loop ``at``, its loops fused and
    spread over the work-group's ``threads`` work-items (TVM puts the barriers around
    it: all loads land before any work-item reads the tile, and the next chunk's loads
    wait for the last reads of this one). ``swap``: the last two loops swapped first
    (the conv's tile: pixels innermost, so neighbouring work-items load neighbouring
    pixels and write neighbouring words)."""
    sch.set_scope(block, 0, "shared")  # first: compute_at then covers all the group's threads
    sch.compute_at(block, at)
    loops = sch.get_loops(block)
    depth = [i for i, loop in enumerate(loops) if same(sch, loop, at)][0] + 1
    loops = loops[depth:]
    if swap and len(loops) >= 2:
        sch.reorder(loops[-1], loops[-2])
        loops = loops[:-2] + [loops[-1], loops[-2]]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    _, inner = sch.split(fused, [None, min(threads, extent)])
    sch.bind(inner, "threadIdx.x")


def _read_index(sch, block, buffer_name: str) -> int:
    reads = sch.get(block).reads
    return [r.source.name for r in reads].index(buffer_name)


def _bind_elementwise(sch, block, max_threads: int) -> None:
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    outer, inner = sch.split(fused, [None, min(extent, max_threads)])
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.x")


def schedule_sparse_conv2d_gpu(sch, max_threads: int = 256,
                               config: GpuScheduleConfig | None = None) -> None:
    """Work-groups over (image, filter block, row, pixel chunk); work-items over
    (pixel, float4 of the block's filters); taps serial per work-item.

    Staged (``config.stage_input``): the taps run in chunks of ``config.stage_taps``;
    per chunk the work-group first gathers the chunk's input values for all its pixels
    (``pixels x taps`` floats) into ``__local`` memory, one load per value spread over
    its work-items, then every work-item reads its pixel's values from there. Without
    staging each value is loaded once per ``float4`` of the block's filters (4 times for
    a 16-filter block) from global memory."""
    config = config or GpuScheduleConfig(max_threads)
    conv = find_block(sch, SPARSE_CONV_BLOCK)
    stage = _should_stage(sch, conv, config)
    staged = None
    if stage:
        from tir_schedules.conv2d import PAD_BLOCK

        pad = find_block(sch, PAD_BLOCK)
        staged = sch.reindex(conv, ("read", _read_index(sch, conv, sch.get(pad).writes[0]
                                                          .source.name)))
        # [.., pixel, tap] -> [.., chunk, tap in chunk, pixel]: a tap's values for the
        # group's pixels are consecutive words (no bank conflicts when the work-items
        # read them), and the chunk is its own axis, so the __local tile is one chunk
        chunk = min(config.stage_taps, int(sch.get(sch.get_loops(conv)[-1]).extent))
        sch.transform_layout(staged, ("write", 0), lambda b, oc, oh, ow, t: (
            b, oc, oh, t // chunk, t % chunk, ow), pad_value=0.0)
    out = _inline_around(sch, conv, keep=staged)
    n, oc, oh, ow, o, tap = sch.get_loops(conv)
    if not stage:
        _map_threads(sch, conv, out, [n, oc, oh, ow], o, tap, config.max_threads)
        return None
    _, threads, tap_chunk = _map_threads_staged(sch, conv, out, [n, oc, oh, ow], o, tap,
                                                config.max_threads, chunk)
    _cooperative(sch, staged, tap_chunk, threads, swap=True)
    return tap_chunk, chunk


def schedule_sparse_dense_gpu(sch, max_threads: int = 256,
                              config: GpuScheduleConfig | None = None) -> None:
    """Work-groups over (row, filter blocks); work-items over (block, float4 of its
    filters), or over whole blocks when the last block is ragged (its outputs are
    written by the epilogue, which then reads one work-item's accumulators). Never
    staged (see :func:`stage_input_pays`)."""
    config = config or GpuScheduleConfig(max_threads)
    dense = find_block(sch, SPARSE_DENSE_BLOCK)
    out = _inline_around(sch, dense)
    *spatial, lanes, tap = sch.get_loops(dense)
    blocks, block = (int(sch.get(loop).extent) for loop in (spatial[-1], lanes))
    ragged = out is not None and int(sch.get(sch.get_loops(out)[-1]).extent) != blocks * block
    _map_threads(sch, dense, out, spatial, lanes, tap, config.max_threads, whole_block=ragged)


def _per_group(extent: int, inner: int, max_threads: int, whole_block: bool) -> int:
    vector = extent if whole_block else _vector(extent)
    return max(1, min(inner, max_threads // (extent // vector)))


def stage_input_pays(device: str, padded: bool) -> bool:
    """The ``"auto"`` rule: stage the conv's input tile on Adreno when the kernel
    zero-pads its input (the KxK convs).

    Unstaged, every work-item (a pixel x a ``float4`` of the block's filters) loads the
    tap index, computes the address and, with padding, the bounds test of each value;
    staged, that is done once per (pixel, tap) of the group and shared by the block's
    ``float4``s. Measured with OpenCL on an H100 (``benchmarks/opencl_staging.py``,
    ``benchmarks/results/opencl_staging.json``): block-punched 3x3 convs of ResNet-18
    at 3x and 5x ran 1.4-3.2x faster staged; the unpadded block-based 1x1 convs of
    MobileNetV2 ran from 10% faster to 27% slower (barriers and the extra local traffic
    buy back only a cheap load there). Mali: never by default, since its ``__local``
    memory is the same cached system memory as ``__global`` (Arm's guidance is not
    to copy into it); the knob forces it for a measurement on a phone."""
    return device == "adreno" and padded


def _pads(sch) -> bool:
    """Whether the kernel zero-pads its input (its padding stage tests the bounds)."""
    from tir_schedules.conv2d import PAD_BLOCK

    pad = find_block(sch, PAD_BLOCK)
    return pad is not None and "if_then_else" in sch.get(pad).body.script()


def _should_stage(sch, block, config: GpuScheduleConfig) -> bool:
    """Whether the conv kernel ``block`` gets the staged schedule: forced by the knob,
    or by :func:`stage_input_pays`; never when the tile would not fit."""
    if config.stage_input is False:
        return False
    *_, pixels, lanes, taps = (int(sch.get(loop).extent) for loop in sch.get_loops(block))
    per_group = _per_group(lanes, pixels, config.max_threads, False)
    staged_bytes = 4 * per_group * min(config.stage_taps, taps)
    if staged_bytes > config.max_local_bytes:
        return False
    if config.stage_input is True:
        return True
    return stage_input_pays(config.device, _pads(sch))


def bound_tap_chunks(func, chunk_var, chunk: int):
    """The staged conv's tap-chunk loop stops at ``ceil(counts[b] / chunk)`` (the block
    is the work-group's, so the bound is uniform over the group and every work-item
    reaches the same barriers); the guard stays for the last chunk's padded taps."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    from tir_schedules.sparse_conv import _is_tap_guard, _substitute

    guards = []

    def find(node, visitor):
        if node.block.name_hint.startswith(SPARSE_CONV_BLOCK):
            bindings = {iv.var: value for iv, value in zip(node.block.iter_vars,
                                                           node.iter_values)}

            def find_guard(call, inner):
                if _is_tap_guard(call):
                    guards.append(_substitute(call.args[0].b, bindings))
                inner.default_visit(call)

            tvm_ffi.structural_visit(node.block.body, [(tvm.ir.Call, find_guard)])
        visitor.default_visit(node)

    tvm_ffi.structural_visit(func.body, [(tvm.s_tir.SBlockRealize, find)])
    if len(guards) != 1:
        return func

    def mutate_for(node, mutator):
        node = mutator.default_mutate(node)
        if not node.loop_var.same_as(chunk_var):
            return node
        dtype = str(node.loop_var.ty)
        count = tirx.Cast(dtype, guards[0])
        extent = tvm.prim.Min(tvm.prim.FloorDiv(count + (chunk - 1), tirx.const(chunk, dtype)),
                              node.extent)
        return tirx.For(node.loop_var, node.min, extent, node.kind, node.body,
                        node.thread_binding, node.annotations)

    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, mutate_for)]))


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


def schedule_sparse_gpu(func, max_threads: int = 256,
                        config: GpuScheduleConfig | None = None):
    """``func`` scheduled for an OpenCL device if it is a sparse kernel, else None."""
    import tvm

    from tir_schedules import kernel_family

    config = config or GpuScheduleConfig(max_threads)
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
    if templates[family] is schedule_pixel_sparse_gpu:
        schedule_pixel_sparse_gpu(sch, config.max_threads)
        # the reduction's init stays in the block (decompose_reduction refuses a block
        # computed at a work-item), so its loops keep their full extent: the guard
        # makes the padded kernels add zeros
        return sch.mod["main"]
    chunked = templates[family](sch, config.max_threads, config)
    if chunked is not None:  # the staged conv: taps in chunks
        loop, chunk = chunked
        return bound_tap_chunks(sch.mod["main"], sch.get(loop).loop_var, chunk)
    return bound_tap_loops(sch.mod["main"])
