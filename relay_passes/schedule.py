"""The pass that gives every CPU kernel a schedule, after legalization and fusion."""

from __future__ import annotations

import tvm

from tir_schedules import CpuScheduleConfig, schedule_primfunc


@tvm.transform.module_pass(opt_level=0, name="ScheduleDenseCPU")
class ScheduleDenseCPU:
    """Schedule each not-yet-scheduled PrimFunc with the template of its family.

    Runs after ``FuseTIR``, so a conv kernel arrives with its epilogue (bias, clamp,
    residual add) and is scheduled as one register-tiled loop nest. A kernel no
    template fits is left as legalized. Scheduled kernels are marked
    ``tirx.is_scheduled`` (as dlight does), so later schedule passes skip them.

    Example::

        seq = tvm.transform.Sequential([relax.transform.LegalizeOps(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                        ScheduleDenseCPU(default_config(spec))])
    """

    def __init__(self, config: CpuScheduleConfig):
        self.config = config

    def transform_module(self, mod, ctx):
        return schedule_unscheduled(mod, lambda func: schedule_primfunc(func, self.config))


def schedule_unscheduled(mod, schedule):
    """``mod`` with each PrimFunc not yet marked ``tirx.is_scheduled`` replaced by
    ``schedule(func)`` (and marked), where that is not None: the loop every schedule
    pass (default templates, tuned records, OpenCL sparse kernels) shares."""
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (
                func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
            continue
        scheduled = schedule(func)
        if scheduled is not None:
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
