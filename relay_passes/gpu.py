"""The Relax pipeline for OpenCL targets (Mali, Adreno), with the sparse kernels.

TVM's GPU pipeline for the target (``gpu_generic``, or ``adreno``'s) with two additions:
the pruned layers are lowered to sparse kernels (and the weights bound) first, and
:class:`ScheduleSparseGPU` gives the fused sparse kernels their OpenCL schedule right
before dlight schedules everything else::

    RemoveFilters -> LowerToSparseKernels -> BindAttachedParams -> LegalizeOps ... FuseTIR
      -> ScheduleSparseGPU -> dlight ApplyDefaultSchedule -> VM lowering
"""

from __future__ import annotations

import tvm

from relay_passes.lower_sparse import LowerToSparseKernels
from relay_passes.remove_filters import RemoveFilters
from relay_passes.weights import BindAttachedParams


@tvm.transform.module_pass(opt_level=0, name="ScheduleSparseGPU")
class ScheduleSparseGPU:
    """Schedule each sparse PrimFunc (with its fused epilogue) for an OpenCL device.

    Runs after ``FuseTIR``; the kernels are marked ``tirx.is_scheduled`` so dlight leaves
    them alone. Other kernels are untouched.
    """

    def __init__(self, max_threads: int = 256, config=None):
        from tir_schedules.sparse_gpu import GpuScheduleConfig

        self.config = config or GpuScheduleConfig(max_threads)
        self.max_threads = self.config.max_threads

    def transform_module(self, mod, ctx):
        from relay_passes.schedule import schedule_unscheduled
        from tir_schedules.sparse_gpu import schedule_sparse_gpu

        return schedule_unscheduled(mod, lambda func: schedule_sparse_gpu(
            func, self.config.max_threads, self.config))


def _backend(target):
    from tvm.relax.backend import adreno, gpu_generic

    return adreno if "adreno" in target.keys else gpu_generic


def gpu_pipeline(spec, on_layer=None, stage_input="auto") -> tvm.transform.Pass:
    """The whole Relax pipeline for an OpenCL ``TargetSpec``. ``stage_input``: the
    sparse kernels' ``__local`` input staging (``"auto"``: where it pays, see
    :func:`tir_schedules.sparse_gpu.stage_input_pays`; ``True`` / ``False``: forced)."""
    from tir_schedules.sparse_gpu import GpuScheduleConfig

    target = spec.tvm_target
    backend = _backend(target)
    max_threads = int(target.attrs.get("max_num_threads", 256))
    config = GpuScheduleConfig(max_threads, "adreno" if "adreno" in target.keys else "mali",
                               stage_input)

    @tvm.transform.module_pass(opt_level=0, name="NpasGPUPipeline")
    def pipeline(mod, ctx):
        with target:
            legalize = list(backend.legalize_passes(target))
            names = [p.info.name for p in legalize]
            at = names.index("ApplyDefaultSchedule") if "ApplyDefaultSchedule" in names \
                else len(legalize)
            legalize.insert(at, ScheduleSparseGPU(max_threads, config))
            return tvm.transform.Sequential([
                *backend.library_dispatch_passes(target),
                RemoveFilters(on_layer), LowerToSparseKernels(spec, on_layer),
                BindAttachedParams(), *legalize,
                *backend.dataflow_lower_passes(target), *backend.finalize_passes(target)])(mod)

    return pipeline
