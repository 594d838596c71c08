"""Default CPU schedules, no tuning needed, for the kernels a CNN compiles to.

Per op family, one compute definition (the math, in TE) and one schedule template
whose tiles come from a :class:`~tir_schedules.config.CpuScheduleConfig`
(x86 and arm differ only there):

* :mod:`.conv2d`: blocked ``NCHW{c}c`` dense/grouped and depthwise convolutions with
  their fused epilogues (bias, clamp, residual add);
* :mod:`.generic`: elementwise/layout kernels, and single-reduction kernels (pools,
  global average pool, dense/matmul);
* :mod:`.sparse_conv`: block-sparse (block-punched / block-based pruned) convs and
  dense layers over gathered taps, with their epilogues.

:func:`schedule_primfunc` picks the template from the kernel's block structure.
"""

from __future__ import annotations

import logging

from tir_schedules.config import CpuScheduleConfig, default_config

__all__ = ["CpuScheduleConfig", "default_config", "schedule_primfunc", "kernel_family",
           "apply_template", "finish_schedule"]

_log = logging.getLogger(__name__)


def kernel_family(func) -> str:
    """Which template schedules ``func``: conv2d, depthwise, sparse_conv2d,
    sparse_dense, reduction or injective."""
    import tvm

    from tir_schedules import conv2d, sparse_conv
    from tir_schedules.common import find_block
    from tir_schedules.generic import _is_reduction

    sch = tvm.s_tir.Schedule(func)
    for family, (prefix, _) in prefixed_templates().items():
        if find_block(sch, prefix) is not None:
            return family
    if find_block(sch, sparse_conv.SPARSE_CONV_BLOCK) is not None:
        return "sparse_conv2d"
    if find_block(sch, sparse_conv.SPARSE_DENSE_BLOCK) is not None:
        return "sparse_dense"
    if find_block(sch, conv2d.CONV_BLOCK) is not None:
        return "conv2d"
    if find_block(sch, conv2d.DEPTHWISE_BLOCK) is not None:
        return "depthwise"
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return "reduction" if any(_is_reduction(sch, b) for b in blocks) else "injective"


def schedule_primfunc(func, cfg: CpuScheduleConfig):
    """``func`` scheduled by its family's template, or None if the template does not fit.

    None leaves the kernel as TVM legalized it: correct, just not fast.
    """
    scheduled = apply_template(func, cfg)
    if scheduled is None:
        return None
    sch, family = scheduled
    return finish_schedule(sch.mod["main"], family)


def apply_template(func, cfg: CpuScheduleConfig):
    """(the Schedule after ``func``'s family template, the family), or None.

    The Schedule's trace is what a tuning database stores: replayed on the same
    PrimFunc and passed through :func:`finish_schedule`, it gives the same kernel.
    """
    import tvm

    from tir_schedules import conv2d, generic, sparse_conv

    templates = {"conv2d": conv2d.schedule_conv2d_nchwc,
                 "sparse_conv2d": sparse_conv.schedule_sparse_conv2d_nchwc,
                 "sparse_dense": sparse_conv.schedule_sparse_dense,
                 "depthwise": conv2d.schedule_depthwise_conv2d_nchwc,
                 "reduction": generic.schedule_reduction,
                 "injective": generic.schedule_injective,
                 **{family: template for family, (_, template)
                    in prefixed_templates().items()}}
    try:
        family = kernel_family(func)
    except Exception:  # no root block (hand-written TIR): not ours to schedule
        return None
    sch = tvm.s_tir.Schedule(func)
    try:
        templates[family](sch, cfg)
    except Exception as err:  # a shape the template does not cover
        _log.debug("no %s schedule: %s", family, str(err).splitlines()[0] if str(err) else err)
        return None
    return sch, family


def prefixed_templates() -> dict:
    """Family -> (block-name prefix, CPU template) of the sparse kernels found by a block
    of their own: the pixel-vectorized ones (UBP's ring, pattern, row-sparse) and UBP's
    phase tiles; checked before the gathered kernels, whose prefix theirs extend."""
    from tir_schedules import sparse_csr, sparse_pattern, sparse_ring, sparse_unaligned

    return {"sparse_ring": (sparse_ring.RING_ROWS_BLOCK, sparse_ring.schedule_ring_conv2d),
            "sparse_phase_tiles": (sparse_unaligned.PHASE_TILES_BLOCK,
                                   sparse_unaligned.schedule_phase_tiles),
            "sparse_pattern_entries": (sparse_pattern.PATTERN_ENTRY_BLOCK,
                                       sparse_pattern.schedule_pattern_entries),
            "sparse_pattern": (sparse_pattern.PATTERN_CONV_BLOCK,
                               sparse_pattern.schedule_pattern_conv2d),
            "sparse_rows": (sparse_csr.ROWS_CONV_BLOCK, sparse_csr.schedule_rows_conv2d)}


def finish_schedule(scheduled, family: str):
    """The TIR rewrites a template needs after its schedule primitives (not traced)."""
    from tir_schedules import sparse_conv
    from tir_schedules.common import parallel_marked_loops

    if family in ("sparse_ring", "sparse_phase_tiles"):  # hand-written TIR
        return parallel_marked_loops(scheduled)
    if family.startswith("sparse"):  # padded taps: bound each block's loop by its count
        return sparse_conv.bound_tap_loops(scheduled)
    return scheduled
