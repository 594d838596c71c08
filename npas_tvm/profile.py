"""Per-op latency breakdown of a compiled model, measured with the Relax VM's instrument hook.

TVM 0.27 has no VM profiler, but ``VirtualMachine.set_instrument`` calls back before
and after every packed call (each kernel, and the VM builtins). Timing those calls
tells which kernels take the time, the question every schedule change starts from::

    from npas_tvm.profile import profile_vm
    report = profile_vm(runner.vm, runner.tensors(inputs), repeat=10)
    print(report.table(top=15))

The hook itself costs about a microsecond per call, so the sum of the per-op times
is a little above an uninstrumented run; compare ops with each other, and models
end to end with :func:`npas_tvm.runtime.time_interleaved`.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class OpTime:
    """The time one kernel (PrimFunc or VM builtin) took per model run."""

    name: str
    calls_per_run: int
    median_ms: float  # median over runs of the summed time of all its calls in one run

    @property
    def kind(self) -> str:
        return op_kind(self.name)


@dataclass
class ProfileReport:
    ops: list[OpTime]
    runs: int
    total_ms: float = field(init=False)

    def __post_init__(self) -> None:
        self.ops.sort(key=lambda op: -op.median_ms)
        self.total_ms = sum(op.median_ms for op in self.ops)

    def by_kind(self) -> dict[str, float]:
        """Milliseconds per op kind (conv, depthwise, dense, pool, layout, ...)."""
        kinds: dict[str, float] = {}
        for op in self.ops:
            kinds[op.kind] = kinds.get(op.kind, 0.0) + op.median_ms
        return dict(sorted(kinds.items(), key=lambda item: -item[1]))

    def table(self, top: int = 15) -> str:
        """A markdown table: the ``top`` ops, then the per-kind summary."""
        lines = [f"per-op breakdown (median of {self.runs} runs, sum {self.total_ms:.2f} ms, "
                 f"{sum(op.calls_per_run for op in self.ops)} calls per run)",
                 "| op | kind | calls | ms | share |", "|---|---|---:|---:|---:|"]
        for op in self.ops[:top]:
            lines.append(f"| {op.name} | {op.kind} | {op.calls_per_run} | {op.median_ms:.3f} | "
                         f"{100 * op.median_ms / max(self.total_ms, 1e-12):.1f}% |")
        rest = self.ops[top:]
        if rest:
            rest_ms = sum(op.median_ms for op in rest)
            lines.append(f"| ({len(rest)} more) | | {sum(op.calls_per_run for op in rest)} | "
                         f"{rest_ms:.3f} | {100 * rest_ms / max(self.total_ms, 1e-12):.1f}% |")
        lines += ["", "| kind | ms | share |", "|---|---:|---:|"]
        for kind, ms in self.by_kind().items():
            lines.append(f"| {kind} | {ms:.3f} | {100 * ms / max(self.total_ms, 1e-12):.1f}% |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"runs": self.runs, "total_ms": self.total_ms, "by_kind": self.by_kind(),
                "ops": [{"name": op.name, "kind": op.kind, "calls": op.calls_per_run,
                         "ms": op.median_ms} for op in self.ops]}


# Name fragments of fused PrimFuncs -> the kind of work; first match wins.
_KINDS = (("vm.builtin", "vm builtin"), ("depthwise", "depthwise conv"),
          ("conv2d", "conv"), ("matmul", "dense"), ("dense", "dense"), ("pool", "pool"),
          ("mean", "pool"), ("layout_transform", "layout"), ("transpose", "layout"),
          ("reshape", "layout"))


def op_kind(name: str) -> str:
    """The kind of an op from its PrimFunc name (``fused_conv2d_add_relu`` -> conv)."""
    lowered = name.lower()
    for fragment, kind in _KINDS:
        if fragment in lowered:
            return kind
    return "elementwise" if re.search(r"add|multiply|maximum|minimum|clip|relu|divide|"
                                      r"subtract|sigmoid|where", lowered) else "other"


def profile_vm(vm, args: list, repeat: int = 10, warmup: int = 2,
               func_name: str = "main") -> ProfileReport:
    """Run ``vm[func_name](*args)`` ``repeat`` times with every packed call timed."""
    from tvm import relax

    for _ in range(warmup):
        vm[func_name](*args)
    started: dict[str, float] = {}
    run_totals: dict[str, float] = {}
    run_calls: dict[str, int] = {}

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            started[name] = time.perf_counter()
        else:
            run_totals[name] = run_totals.get(name, 0.0) + time.perf_counter() - started[name]
            run_calls[name] = run_calls.get(name, 0) + 1
        return relax.VMInstrumentReturnKind.NO_OP

    per_run: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            run_totals.clear()
            run_calls.clear()
            vm[func_name](*args)
            per_run.append(dict(run_totals))
            calls = dict(run_calls)
    finally:
        vm.set_instrument(None)
    names = sorted({name for run in per_run for name in run})
    ops = [OpTime(name, calls.get(name, 0),
                  1e3 * statistics.median(run.get(name, 0.0) for run in per_run))
           for name in names]
    return ProfileReport(ops, repeat)
