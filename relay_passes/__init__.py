"""Relax graph passes of npas-tvm, each a small pass with one job.

:func:`dense_cpu_pipeline` composes them with TVM's CPU backend passes into the
Relax pipeline used for llvm targets::

    ClampCallTIRToOps -> BlockedConvLayout -> FoldConstant (pre-packs weights)
      -> LegalizeBlockedConv2d -> LegalizeOps -> FuseOps -> FuseTIR
      -> ScheduleDenseCPU -> VM lowering
"""

from __future__ import annotations

import tvm

from relay_passes.canonicalize import ClampCallTIRToOps
from relay_passes.layout import BlockedConvLayout, LegalizeBlockedConv2d
from relay_passes.schedule import ScheduleDenseCPU

__all__ = ["ClampCallTIRToOps", "BlockedConvLayout", "LegalizeBlockedConv2d",
           "ScheduleDenseCPU", "dense_cpu_passes", "dense_cpu_pipeline"]


def dense_cpu_passes(spec) -> list:
    """The graph passes (through scheduling) of the dense CPU path, in order."""
    from tvm import relax
    from tvm.relax.backend import cpu_generic

    from tir_schedules import default_config

    config = default_config(spec)
    return [
        *cpu_generic.library_dispatch_passes(spec.tvm_target),
        relax.transform.FoldConstant(),  # the frontend's clamp bounds become scalars
        ClampCallTIRToOps(),
        BlockedConvLayout(config.lanes),
        relax.transform.Normalize(),
        relax.transform.FoldConstant(),  # pre-pack the weights into the blocked layout
        LegalizeBlockedConv2d(),
        *cpu_generic.legalize_passes(spec.tvm_target),  # LegalizeOps ... FuseOps, FuseTIR
        ScheduleDenseCPU(config),
    ]


def dense_cpu_pipeline(spec) -> tvm.transform.Pass:
    """The whole Relax pipeline for an llvm ``TargetSpec``: our passes, then VM lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = spec.tvm_target

    @tvm.transform.module_pass(opt_level=0, name="NpasDenseCPUPipeline")
    def pipeline(mod, ctx):
        with target:
            return tvm.transform.Sequential(
                [*dense_cpu_passes(spec), *cpu_generic.dataflow_lower_passes(target),
                 *cpu_generic.finalize_passes(target)])(mod)

    return pipeline
