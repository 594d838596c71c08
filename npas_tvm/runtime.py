"""Running compiled models and onnxruntime side by side: numerics and latency.

Both engines get the same thread count (``TVM_NUM_THREADS``; TVM's pool otherwise
takes half the CPUs), and timings are medians of interleaved rounds after warm-up,
with a pause between engines until the process is idle, so that one engine's thread
pool, still spinning after its call, does not slow the next (:func:`wait_until_idle`).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

REL_TOLERANCE = 1e-4


def default_threads() -> int:
    """The thread count both engines use: ``TVM_NUM_THREADS`` or every CPU."""
    return int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)


def ensure_thread_env() -> int:
    """Set ``TVM_NUM_THREADS`` before TVM's runtime starts its pool; returns the count."""
    threads = default_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return threads


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float  # max |a - b| / max |reference|

    @property
    def ok(self) -> bool:
        return self.max_rel <= REL_TOLERANCE

    def __str__(self) -> str:
        return f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}"

    def report(self) -> str:
        """The line printed after a check against onnxruntime."""
        verdict = "OK" if self.ok else f"MISMATCH (tolerance {REL_TOLERANCE:g} relative)"
        return f"check vs onnxruntime: {self}: {verdict}"


def compare(outputs: list[np.ndarray], references: list[np.ndarray]) -> Comparison:
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs vs {len(references)} reference outputs")
    max_abs, max_rel = 0.0, 0.0
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            raise ValueError(f"output shape {out.shape} vs reference {ref.shape}")
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if out.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return Comparison(max_abs, max_rel)


def ort_session(model, threads: int | None = None):
    """An onnxruntime CPU session for a model path or ``ModelProto``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ort_session(model).run(None, inputs))


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int


class TVMRunner:
    """A compiled library on a device: local (executable or ``.so`` path) or remote.

    For a remote device pass the module loaded through the RPC session and the
    session's device (``session.cpu()``/``session.cl()``).
    """

    def __init__(self, library, input_names: list[str], device=None):
        import tvm
        from tvm import relax

        if isinstance(library, str):
            library = tvm.runtime.load_module(library)
        self.device = device if device is not None else tvm.cpu()
        self.vm = relax.VirtualMachine(library, self.device)
        self.input_names = input_names

    def tensors(self, inputs: dict[str, np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), self.device)
                for name in self.input_names]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _flatten(self.vm["main"](*self.tensors(inputs)))


    def time(self, inputs: dict[str, np.ndarray], number: int = 10, repeat: int = 5,
             warmup: int = 1) -> Timing:
        """Time ``main`` where it runs (remote devices time themselves)."""
        evaluator = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat,
                                           min_repeat_ms=0)
        tensors = self.tensors(inputs)
        for _ in range(warmup):
            self.vm["main"](*tensors)
        samples = [t * 1e3 for t in evaluator(*tensors).results]
        return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out: list[np.ndarray] = []
    for item in value:
        out.extend(_flatten(item))
    return out


IDLE_CPU_SHARE = 0.25  # of one CPU: below it over a window, the process is idle
IDLE_WINDOW_S = 0.02


def wait_until_idle(max_s: float = 1.0) -> float:
    """Sleep until this process's threads are idle (they used less than
    :data:`IDLE_CPU_SHARE` of a CPU over :data:`IDLE_WINDOW_S`), or ``max_s``; the
    seconds waited.

    Thread pools spin after a call before they sleep. TVM's workers keep a CPU busy for
    about 0.2 s (2 threads on a 2-CPU Zen3 host); an onnxruntime call that started 50 ms
    after a TVM call took 22-24 ms instead of 6.6 (MobileNetV2), so a fixed short pause
    between engines made onnxruntime look 3.5 times slower than it is."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        cpu = time.process_time()
        time.sleep(IDLE_WINDOW_S)
        if time.process_time() - cpu < IDLE_CPU_SHARE * IDLE_WINDOW_S:
            break
    return time.perf_counter() - start


def time_interleaved(engines: dict[str, Callable[[], object]], rounds: int = 20,
                     warmup: int = 3, pause_s: float = 0.05,
                     budget_s: float | None = 60.0,
                     warm_call: bool = True) -> dict[str, Timing]:
    """Median latency of each engine, over rounds that alternate the engines.

    Each round runs every engine, rotating the order: an untimed call that wakes its
    threads and warms its caches (``warm_call``; engines that are blocks of many calls
    need none), then the timed call. The first ``warmup`` calls per engine are not
    timed. After each engine the process waits at least ``pause_s`` and until it is
    idle (:func:`wait_until_idle`), so no engine runs beside another's spinning
    threads. ``budget_s`` lowers ``rounds`` (to at least 3) for slow engines so a demo
    stays short.
    """
    names = list(engines)
    round_s: dict[str, float] = {}  # an engine's share of a round, from its first call
    for name in names:
        for i in range(max(warmup, 1)):
            start = time.perf_counter()
            engines[name]()
            if i == 0:
                round_s[name] = (1 + warm_call) * (time.perf_counter() - start)
        round_s[name] += _settle(pause_s)
    if budget_s is not None:
        rounds = max(3, min(rounds, int(budget_s / max(sum(round_s.values()), 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            if warm_call:
                engines[name]()
            start = time.perf_counter()
            engines[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
            _settle(pause_s)
    return {name: Timing(statistics.median(s), min(s), max(s), len(s))
            for name, s in samples.items()}


def _settle(pause_s: float) -> float:
    """Sleep ``pause_s``, then until the process is idle; the seconds it took."""
    time.sleep(pause_s)
    return pause_s + wait_until_idle()
