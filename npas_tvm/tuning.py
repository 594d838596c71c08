"""Tuning the CPU kernels' knobs with meta_schedule, and applying the results.

The search starts from our schedule templates, not from scratch: a task's candidates
are its template applied with every point of its family's knob space
(``tir_schedules.config.TUNABLE_KNOBS``: tiles, unroll, vector width, parallel or
serial ...), deduplicated by the scheduled kernel's structural hash. The default
config's schedule is measured first; meta_schedule's XGBoost cost model, trained on
what was measured, ranks the rest, and the best ranked are measured next with
meta_schedule's builder and runner (``LocalRunner`` here, ``RPCRunner`` on a device
through a tracker).

Results go to an ordinary meta_schedule ``JSONDatabase``: the workload is
``IRModule({"main": fused PrimFunc})`` as the pipeline produces it just before
``ScheduleDenseCPU``, and the record's trace is the template's own schedule trace,
so replaying it on the same PrimFunc gives the same kernel. Records are committed as
soon as they are measured, which is what makes an interrupted run resumable: a re-run
rebuilds the candidates, recognizes the measured ones by their replayed kernels and
measures only the rest.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from npas_tvm.errors import NpasError
from npas_tvm.targets import TargetSpec

_log = logging.getLogger("npas_tvm")

FAILED_SECONDS = 1e9  # meta_schedule's run time of a candidate that failed to build or run
MIN_TASK_FLOPS = 200_000  # smaller kernels are not worth a measurement
TUNED_FAMILIES = ("conv2d", "depthwise", "sparse_conv2d", "sparse_dense",
                  "sparse_pattern_entries", "reduction")


class TuningError(NpasError):
    """The tuning database or the tuning setup is unusable."""


# ------------------------------------------------------------------ tasks


@dataclass
class Task:
    """One distinct fused kernel of the model: what is tuned, and how much it matters."""

    name: str  # the first GlobalVar that calls it
    func: "object"  # tvm.tirx.PrimFunc, unscheduled
    family: str
    flops: int
    calls: int  # call sites in main with this kernel
    int_args: dict[int, np.ndarray] = field(default_factory=dict)  # index tensors' values

    @property
    def weight(self) -> int:
        return self.flops * self.calls

    @functools.cached_property
    def workload(self):
        """The meta_schedule workload module: ``{"main": func}``."""
        import tvm

        return tvm.IRModule({"main": self.func})


def workload_module(func):
    import tvm

    return tvm.IRModule({"main": func})


def prepare_module(model, spec: TargetSpec, npas: str | None = None, rate: float | None = None):
    """The Relax module ``compile`` builds (pruned as ``--npas`` says)."""
    import tvm

    from npas_tvm.compiler import import_onnx

    mod = import_onnx(model).mod
    if npas is None:
        return mod
    from npas_tvm.sparse_compile import annotate_pass
    from relay_passes import ApplyPruning

    annotate, _ = annotate_pass(model, spec, npas, rate)
    return tvm.transform.Sequential([annotate, ApplyPruning()])(mod)


def _kernel_flops(func) -> int:
    """Work of a kernel: loop iterations of its blocks (x2 for reductions)."""
    import tvm

    from tir_schedules.common import loop_extents
    from tir_schedules.generic import _is_reduction

    sch = tvm.s_tir.Schedule(func)
    total = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        work = math.prod(loop_extents(sch, block))
        total += 2 * work if _is_reduction(sch, block) else work
    return total


def extract_tasks(mod, spec: TargetSpec, *, min_flops: int = MIN_TASK_FLOPS,
                  families: Sequence[str] = TUNED_FAMILIES) -> list[Task]:
    """The distinct fused kernels ``mod`` compiles to, just before ``ScheduleDenseCPU``.

    Identical kernels (structural hash) are one task weighted by their call count;
    kernels outside ``families`` (elementwise ones) and under ``min_flops`` are left
    out (the tuner's defaults: :data:`TUNED_FAMILIES`, :data:`MIN_TASK_FLOPS`).
    """
    import tvm
    import tvm_ffi
    from tvm import relax

    from relay_passes import dense_cpu_passes
    from tir_schedules import kernel_family

    with spec.tvm_target:
        lowered = tvm.transform.Sequential(dense_cpu_passes(spec)[:-1])(mod)
    calls: dict[str, list] = {}
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) \
                    and value.op.name == "relax.call_tir":
                calls.setdefault(value.args[0].name_hint, []).append(list(value.args[1].fields))
    tasks: dict[int, Task] = {}
    for gvar, func in lowered.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or gvar.name_hint not in calls:
            continue
        try:
            family = kernel_family(func)
        except Exception:  # hand-written TIR without a root block
            continue
        if family not in families:
            continue
        flops = _kernel_flops(func)
        if flops < min_flops:
            continue
        key = tvm_ffi.structural_hash(func)
        sites = calls[gvar.name_hint]
        if key in tasks and tvm_ffi.structural_equal(tasks[key].func, func):
            tasks[key].calls += len(sites)
            continue
        int_args = {}
        for index, arg in enumerate(sites[0]):
            if isinstance(arg, tvm.ir.GenericConst) and "int" in str(arg.value.dtype):
                int_args[index] = arg.value.numpy()
        tasks[key] = Task(gvar.name_hint, func, family, flops, len(sites), int_args)
    return sorted(tasks.values(), key=lambda t: -t.weight)


def split_budget(tasks: Sequence[Task], trials: int, limits: Sequence[int]) -> list[int]:
    """Trials per task, proportional to its FLOPs x calls, each within its candidates.

    Tasks the rounding leaves at 0 get one trial (their default schedule's) while the
    budget lasts, heaviest first; what a small space cannot use goes to the others.
    """
    total = sum(t.weight for t in tasks) or 1
    budget = [min(limit, int(trials * t.weight / total)) for t, limit in zip(tasks, limits)]
    left = trials - sum(budget)
    while left > 0:
        open_tasks = [i for i, limit in enumerate(limits) if budget[i] < limit]
        if not open_tasks:
            break
        zero = [i for i in open_tasks if budget[i] == 0]
        index = zero[0] if zero else max(open_tasks, key=lambda i: tasks[i].weight
                                         / (budget[i] + 1))
        budget[index] += 1
        left -= 1
    return budget


# ------------------------------------------------------------------ candidates


@dataclass
class Candidate:
    """One knob point of a task: its schedule (the trace) and its final kernel."""

    config: "object"  # CpuScheduleConfig
    sch: "object"  # tvm.s_tir.Schedule after the template
    kernel: "object"  # the final PrimFunc (after finish_schedule)
    key: int  # structural hash of the final kernel


def candidates_for(task: Task, base_config) -> list[Candidate]:
    """The distinct schedules of ``task``'s knob space, the default config's first."""
    import tvm_ffi

    from tir_schedules import apply_template, finish_schedule
    from tir_schedules.config import knob_candidates

    found: dict[int, Candidate] = {}
    for config in knob_candidates(task.family, base_config):
        applied = apply_template(task.func, config)
        if applied is None:
            continue
        sch, family = applied
        kernel = finish_schedule(sch.mod["main"], family)
        key = tvm_ffi.structural_hash(kernel)
        if key not in found:
            found[key] = Candidate(config, sch, kernel, key)
    return list(found.values())


def replay(func, trace):
    """``func`` scheduled by a database record's trace (and finished), or None."""
    import tvm

    from tir_schedules import finish_schedule, kernel_family

    sch = tvm.s_tir.Schedule(func)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
        return finish_schedule(sch.mod["main"], kernel_family(func))
    except Exception as err:  # a record made by another version of the templates
        _log.debug("cannot replay a tuning record: %s", str(err).splitlines()[:1])
        return None


# ------------------------------------------------------------------ measuring


def _build_library(kernel, target, linker: str | None, directory: str) -> str:
    """One kernel built and exported as a ``.so`` linked for the target (a ``.tar`` would
    make the device link it with a compiler it does not have).

    Built in this process: meta_schedule's ``LocalBuilder`` starts a worker pool per
    batch, which cost ~25 s per batch on a busy 2-core machine against 0.3 s here."""
    import tempfile

    import tvm
    from tvm.support import cc

    from tir_schedules.lowering import cpu_pipeline

    library = tvm.tirx.build(workload_module(kernel.with_attr("global_symbol", "main")),
                             target=target, pipeline=cpu_pipeline())
    path = os.path.join(tempfile.mkdtemp(prefix="kernel-", dir=directory), "kernel.so")
    kwargs = {"fcompile": cc.cross_compiler(linker)} if linker else {}
    library.export_library(path, **kwargs)
    return path


class _Arguments:
    """Runner argument allocation: random floats, except index tensors (a sparse
    kernel's taps and counts), which get the model's own values so every access
    stays in bounds and the work matches the real layer's."""

    def __init__(self, int_args: dict[str, dict[int, np.ndarray]]):
        self.int_args = int_args  # args_info JSON (as a string) -> {index: values}

    def allocate(self, device, args_info, alloc_repeat: int, fill) -> list[list]:
        import tvm

        known = self.int_args.get(repr(tuple(tuple(_jsonable(a)) for a in args_info)), {})
        repeated = []
        for _ in range(alloc_repeat):
            args = []
            for index, (_, dtype, shape) in enumerate(args_info):
                if index in known:
                    args.append(tvm.runtime.tensor(known[index].astype(dtype), device))
                else:
                    args.append(tvm.runtime.empty(shape=shape, dtype=dtype, device=device))
                    fill(args[-1])
            repeated.append(args)
        return repeated


def _jsonable(info):
    return [str(info[0]), str(info[1]), [int(d) for d in info[2]]]


def _args_key(args_info) -> str:
    return repr(tuple(tuple(_jsonable(list(a.as_json()))) for a in args_info))


class _LocalAlloc(_Arguments):
    def __call__(self, device, args_info, alloc_repeat):
        import tvm

        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
        return self.allocate(device, args_info, alloc_repeat, fill)


class _RemoteAlloc(_Arguments):
    def __call__(self, session, device, args_info, alloc_repeat):
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
        return self.allocate(device, args_info, alloc_repeat, fill)


class _CheckedSession:
    """RPC session creation that fails at once when the device left the tracker
    (the tracker would otherwise queue the request until the session times out)."""

    def __init__(self, tracker: str, key: str):
        self.tracker, self.key = tracker, key

    def __call__(self, rpc_config):
        from npas_tvm.device import tracker_keys

        if self.key not in tracker_keys(self.tracker):
            raise ConnectionError(f"device {self.key!r} is not registered at {self.tracker}")
        return rpc_config.connect_server()


@dataclass
class Measurer:
    """meta_schedule's builder and runner for a target, local or through a tracker."""

    spec: TargetSpec
    tracker: str | None = None
    key: str | None = None
    int_args: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self):
        from tvm.s_tir import meta_schedule as ms

        from npas_tvm.targets import check_cross_compiler

        self.linker = check_cross_compiler(self.spec)
        if self.tracker:
            from npas_tvm.device import parse_address

            host, port = parse_address(self.tracker, "--rpc-tracker")
            self.runner = ms.runner.RPCRunner(
                ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                    tracker_key=self.key, session_priority=1,
                                    session_timeout_sec=120),
                ms.runner.EvaluatorConfig(number=2, repeat=1, min_repeat_ms=0),
                f_create_session=_CheckedSession(self.tracker, self.key),
                f_alloc_argument=_RemoteAlloc(self.int_args), max_workers=1)
        else:
            if not self.spec.runs_on_host:
                raise TuningError(f"target {self.spec.name} does not run here: tune it on a "
                                  "device with --rpc-tracker and --rpc-key")
            self.runner = ms.runner.LocalRunner(
                ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=30),
                f_alloc_argument=_LocalAlloc(self.int_args))

    def measure(self, kernels: Sequence) -> list[tuple[list[float] | None, str | None]]:
        """(run seconds, error) per kernel (a PrimFunc), built and run in order."""
        import shutil
        import tempfile

        from tvm.s_tir import meta_schedule as ms

        directory = tempfile.mkdtemp(prefix="npas-tune-")
        inputs, results = [], [None] * len(kernels)
        try:
            for index, kernel in enumerate(kernels):
                try:
                    path = _build_library(kernel, self.spec.tvm_target, self.linker, directory)
                except Exception as err:  # a knob point the code generator rejects
                    results[index] = (None, "build: " + (str(err).strip().splitlines()
                                                         or [type(err).__name__])[-1])
                    continue
                args_info = ms.arg_info.ArgInfo.from_prim_func(kernel)
                inputs.append((index, ms.runner.RunnerInput(path, "cpu", args_info)))
            futures = self.runner.run([runner_input for _, runner_input in inputs])
            for (index, _), future in zip(inputs, futures):
                outcome = future.result()
                if outcome.error_msg:
                    results[index] = (None, outcome.error_msg.strip())
                else:
                    results[index] = ([float(s) for s in outcome.run_secs], None)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return results

    def device_present(self) -> bool:
        if not self.tracker:
            return True
        from npas_tvm.device import DeviceError, tracker_keys

        try:
            return self.key in tracker_keys(self.tracker)
        except DeviceError:
            return False


def _is_device_fault(error: str) -> bool:
    """Errors that say the device or the connection is gone, not that the kernel failed."""
    words = ("connect", "socket", "session", "timeout", "timed out", "rpc", "tracker",
             "broken pipe", "reset by peer", "not registered", "eof")
    lower = error.lower()
    return any(word in lower for word in words) and "build:" not in lower


# ------------------------------------------------------------------ the tuner


@dataclass
class TuneReport:
    tasks: int
    measured: int  # new measurements this run
    reused: int  # candidates already in the database
    planned: int  # trials this run set out to do
    stopped: str | None = None  # why the run ended early
    best: list[tuple[str, float, float]] = field(default_factory=list)  # name, default, best s


def open_database(work_dir: str):
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(work_dir, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=work_dir)


def _median(run_secs) -> float:
    return float(np.median([float(s) for s in run_secs]))


def tune(tasks: Sequence[Task], spec: TargetSpec, work_dir: str, trials: int,
         tracker: str | None = None, key: str | None = None, batch: int = 4,
         device_retries: int = 3, retry_wait_s: float = 5.0, progress: bool = True,
         log: Callable[[str], None] = print, time_budget_s: float | None = None) -> TuneReport:
    """Measure up to ``trials`` candidates over ``tasks`` (what the database already
    holds counts toward each task's share), committing each result at once; stop
    starting batches after ``time_budget_s``."""
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    from tir_schedules import default_config

    base = default_config(spec)
    target = spec.tvm_target
    db = open_database(work_dir)
    started = time.perf_counter()
    spaces = [candidates_for(task, base) for task in tasks]
    budgets = split_budget(tasks, trials, [len(space) for space in spaces])
    int_args = {}
    for task in tasks:
        if task.int_args:
            info = ms.arg_info.ArgInfo.from_prim_func(task.func)
            int_args[_args_key(info)] = task.int_args
    measurer = Measurer(spec, tracker, key, int_args)
    model = ms.cost_model.XGBModel(num_warmup_samples=1, adaptive_training=False)
    rng = random.Random(0)
    done: list[dict[int, list[float]]] = []
    for task, space in zip(tasks, spaces):
        workload = db.commit_workload(task.workload)
        measured = {}
        for record in db.get_top_k(workload, 10**6):
            kernel = replay(task.func, record.trace)
            if kernel is not None:
                import tvm_ffi

                measured[tvm_ffi.structural_hash(kernel)] = [float(s) for s in record.run_secs]
        done.append(measured)
    reused = sum(sum(1 for c in space if c.key in measured)
                 for space, measured in zip(spaces, done))
    todo = [max(0, budget - sum(1 for c in space if c.key in measured))
            for budget, space, measured in zip(budgets, spaces, done)]
    report = TuneReport(len(tasks), 0, reused, sum(todo))
    log(f"tuning {len(tasks)} tasks ({sum(len(s) for s in spaces)} candidate schedules) on "
        f"{'device ' + repr(key) + ' via ' + tracker if tracker else 'this machine'}: "
        f"{report.planned} trials to measure, {reused} already in {work_dir}")
    bar = tqdm(total=report.planned, unit="trial", desc="tuning", disable=not progress,
               dynamic_ncols=True)
    try:
        for task, space, measured, count in zip(tasks, spaces, done, todo):
            context = ms.TuneContext(mod=task.workload, target=target, num_threads=1)
            known = [c for c in space if c.key in measured]
            if known:
                model.update(context, [_candidate(c) for c in known],
                             [ms.runner.RunnerResult(measured[c.key], None) for c in known])
            while count > 0:
                if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                    report.stopped = f"time budget of {time_budget_s:.0f} s spent"
                    return report
                pending = [c for c in space if c.key not in measured]
                if not pending:
                    break
                size = min(batch, count)
                if pending[0] is space[0]:  # the default schedule, first
                    chosen = [pending[0]] + rng.sample(pending[1:], min(size - 1,
                                                                        len(pending) - 1))
                else:
                    scores = model.predict(context, [_candidate(c) for c in pending])
                    order = np.argsort(-np.asarray(scores))
                    chosen = [pending[i] for i in order[:size]]
                results = _measure_with_retries(measurer, chosen, device_retries,
                                                retry_wait_s, log)
                if results is None:
                    report.stopped = (f"device {key!r} lost; stopped after "
                                      f"{report.measured} new measurements")
                    return report
                kept, outcomes = [], []
                for candidate, (run_secs, error) in zip(chosen, results):
                    if run_secs is None:
                        _log.debug("candidate failed: %s", error)
                        run_secs = [FAILED_SECONDS]
                    db.commit_tuning_record(ms.database.TuningRecord(
                        candidate.sch.trace, db.commit_workload(task.workload), run_secs,
                        target, ms.arg_info.ArgInfo.from_prim_func(task.func)))
                    measured[candidate.key] = run_secs
                    kept.append(candidate)
                    outcomes.append(ms.runner.RunnerResult(run_secs, None))
                report.measured += len(kept)
                count -= len(kept)
                bar.update(len(kept))
                model.update(context, [_candidate(c) for c in kept], outcomes)
        return report
    finally:
        bar.close()
        for task, space, measured in zip(tasks, spaces, done):
            if space and space[0].key in measured and measured:
                best = min(_median(s) for s in measured.values())
                report.best.append((task.name, _median(measured[space[0].key]), best))
        _log.debug("tuning took %.0f s", time.perf_counter() - started)


def _candidate(candidate: Candidate):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    return ms.MeasureCandidate(tvm.s_tir.Schedule(candidate.kernel),
                               ms.arg_info.ArgInfo.from_prim_func(candidate.kernel))


def _measure_with_retries(measurer: Measurer, chosen: Sequence[Candidate], retries: int,
                          wait_s: float, log):
    """Results of one batch; None when the device stayed away through every retry."""
    for attempt in range(retries + 1):
        results = measurer.measure([c.kernel for c in chosen])
        faults = [error for _, error in results if error and _is_device_fault(error)]
        if not faults and measurer.device_present():
            return results
        if not faults:  # the device left after this batch ran: its results stand
            return results
        if attempt < retries:
            log(f"device unreachable ({faults[0].splitlines()[-1][:120]}); retry "
                f"{attempt + 1} of {retries} in {wait_s:.0f} s")
            time.sleep(wait_s)
    return None


# ------------------------------------------------------------------ applying


@dataclass
class TuningDatabase:
    """A tuning work dir, applied by ``compile --tuning-db``: counts what it matched."""

    work_dir: str
    spec: TargetSpec
    applied: int = 0
    kernels: int = 0

    def __post_init__(self):
        if not os.path.isdir(self.work_dir) or not os.path.isfile(
                os.path.join(self.work_dir, "database_workload.json")):
            raise TuningError(f"--tuning-db {self.work_dir}: not a tuning database (no "
                              "database_workload.json; run `npas-tvm tune` first)")
        self.db = open_database(self.work_dir)

    def best_schedule(self, func):
        """``func`` scheduled by the database's best record for this target, or None."""
        self.kernels += 1
        mod = workload_module(func)
        if not self.db.has_workload(mod):
            return None
        target = str(self.spec.tvm_target)
        for record in self.db.get_top_k(self.db.commit_workload(mod), 10**6):
            if record.run_secs is None or _median(record.run_secs) >= FAILED_SECONDS:
                continue
            if record.target is not None and str(record.target) != target:
                continue
            scheduled = replay(func, record.trace)
            if scheduled is not None:
                self.applied += 1
                return scheduled
        return None

    def summary(self) -> str:
        return (f"tuning database {self.work_dir}: tuned schedules for {self.applied} of "
                f"{self.kernels} kernels")


def apply_database_pass(database: TuningDatabase):
    """The pass before ``ScheduleDenseCPU``: kernels the database knows get its best
    schedule (marked scheduled, so the default templates skip them)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
    def apply(mod, ctx):
        from relay_passes.schedule import schedule_unscheduled

        return schedule_unscheduled(mod, database.best_schedule)

    return apply
