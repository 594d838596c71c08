"""Running compiled models and onnxruntime side by side: numerics and latency.

Both engines get the same thread count (``TVM_NUM_THREADS``; TVM's pool otherwise
takes half the CPUs), and timings are medians of interleaved rounds after warm-up,
with a pause between engines so their spinning thread pools do not slow each other.
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


def time_interleaved(engines: dict[str, Callable[[], object]], rounds: int = 20,
                     warmup: int = 3, pause_s: float = 0.05,
                     budget_s: float | None = 60.0) -> dict[str, Timing]:
    """Median latency of each engine, over rounds that alternate the engines.

    Each round calls every engine once, rotating the order; the first ``warmup``
    calls per engine are not timed. ``budget_s`` lowers ``rounds`` (to at least 3) for
    slow engines so a demo stays short.
    """
    names = list(engines)
    first: dict[str, float] = {}
    for name in names:
        for i in range(max(warmup, 1)):
            start = time.perf_counter()
            engines[name]()
            if i == 0:
                first[name] = time.perf_counter() - start
        time.sleep(pause_s)
    if budget_s is not None:
        per_round = sum(first.values()) + pause_s * len(names)
        rounds = max(3, min(rounds, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            start = time.perf_counter()
            engines[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
            time.sleep(pause_s)
    return {name: Timing(statistics.median(s), min(s), max(s), len(s))
            for name, s in samples.items()}
