"""Relax graph passes of npas-tvm, each a small pass with one job.

(The package keeps the name ``relay_passes`` of the NPAS design; the passes are
written on Relax, Relay's successor in TVM, which is the only graph IR TVM has now.)

Pruning passes, run while weights are still named parameters of ``main``::

    AnnotatePruning(plan) | DetectSparsity()   # which scheme each layer follows
      -> ApplyPruning()                          # mask the weights (one shot)

:func:`dense_cpu_pipeline` composes the rest with TVM's CPU backend passes into the
Relax pipeline used for llvm targets::

    ClampCallTIRToOps -> RemoveFilters -> BlockedConvLayout -> LowerToSparseKernels
      -> BindAttachedParams
      -> FoldConstant (pre-packs weights) -> LegalizeBlockedConv2d -> LegalizeOps
      -> FuseOps -> FuseTIR -> ScheduleDenseCPU -> VM lowering
"""

from __future__ import annotations

import tvm

from relay_passes.annotate import AnnotatePruning, DetectSparsity
from relay_passes.apply_pruning import ApplyPruning
from relay_passes.canonicalize import ClampCallTIRToOps
from relay_passes.layout import BlockedConvLayout, LegalizeBlockedConv2d
from relay_passes.lower_sparse import LoweredLayer, LowerToSparseKernels
from relay_passes.remove_filters import RemoveFilters
from relay_passes.replace_activations import ReplaceMobileUnfriendlyOps
from relay_passes.schedule import ScheduleDenseCPU
from relay_passes.sparse_kernels import SparseKernel, register_sparse_kernel
from relay_passes.weights import BindAttachedParams

__all__ = ["AnnotatePruning", "DetectSparsity", "ApplyPruning", "LowerToSparseKernels",
           "LoweredLayer", "RemoveFilters", "BindAttachedParams", "SparseKernel", "register_sparse_kernel",
           "ClampCallTIRToOps", "BlockedConvLayout", "LegalizeBlockedConv2d",
           "ScheduleDenseCPU", "dense_cpu_passes", "dense_cpu_pipeline",
           "ReplaceMobileUnfriendlyOps"]


def dense_cpu_passes(spec, on_layer=None, tuning_db=None) -> list:
    """The graph passes (through scheduling) of the CPU path, in order.

    Annotated layers become sparse kernels (``on_layer`` receives a row per layer);
    the rest get the dense blocked kernels. With ``tuning_db`` (a
    :class:`npas_tvm.tuning.TuningDatabase`) the kernels it has records for take its
    best schedules; the others keep the default templates."""
    from tvm import relax
    from tvm.relax.backend import cpu_generic

    from tir_schedules import default_config

    config = default_config(spec)
    return [
        *cpu_generic.library_dispatch_passes(spec.tvm_target),
        relax.transform.FoldConstant(),  # the frontend's clamp bounds become scalars
        ClampCallTIRToOps(),
        RemoveFilters(on_layer),
        BlockedConvLayout(config.lanes),
        LowerToSparseKernels(spec, on_layer),
        BindAttachedParams(),
        relax.transform.Normalize(),
        relax.transform.FoldConstant(),  # pre-pack the weights into the blocked layout
        LegalizeBlockedConv2d(),
        *cpu_generic.legalize_passes(spec.tvm_target),  # LegalizeOps ... FuseOps, FuseTIR
        *([] if tuning_db is None else [_apply_database(tuning_db)]),
        ScheduleDenseCPU(config),
    ]


def _apply_database(tuning_db):
    from npas_tvm.tuning import apply_database_pass

    return apply_database_pass(tuning_db)


def dense_cpu_pipeline(spec, on_layer=None, tuning_db=None) -> tvm.transform.Pass:
    """The whole Relax pipeline for an llvm ``TargetSpec``: our passes, then VM lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = spec.tvm_target

    @tvm.transform.module_pass(opt_level=0, name="NpasDenseCPUPipeline")
    def pipeline(mod, ctx):
        with target:
            return tvm.transform.Sequential(
                [*dense_cpu_passes(spec, on_layer, tuning_db),
                 *cpu_generic.dataflow_lower_passes(target),
                 *cpu_generic.finalize_passes(target)])(mod)

    return pipeline
