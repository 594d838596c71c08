"""The engines the benchmark suite compares, each as "a callable that runs one inference".

onnxruntime, MNN (dense, and its sparse mode on a pruned model), PyTorch eager, and TVM
libraries (dense untuned, dense tuned, npas-tvm sparse) are all driven the same way, so
one interleaved timing loop measures them side by side.

MNN's pip package ships a Python wrapper for its converter (``MNN.tools.mnnconvert``)
that imports a logging module which ``pip install``s a telemetry SDK into the running
interpreter and reports every conversion over the network. The suite never imports that
wrapper: :func:`mnn_convert` calls the converter's C extension (``_tools.mnnconvert``)
in a child process in which the telemetry module cannot be imported, ``pip`` and
``os.system`` cannot run, and no socket can connect; the child fails loudly if anything
tries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Callable

import numpy as np

# Run in the child before the converter: block the telemetry import, subprocesses and
# network connections; report any attempt on stderr and exit non-zero.
GUARD = textwrap.dedent("""
    import importlib.abc, os, socket, subprocess, sys

    attempts = []

    class _NoTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("MNN.tools.utils.log", "aliyun")):
                attempts.append("import " + name)
                raise ImportError(name + " is blocked (telemetry)")
            return None

    sys.meta_path.insert(0, _NoTelemetry())

    def _refuse(what):
        def refuse(*args, **kwargs):
            attempts.append(what)
            raise PermissionError(what + " is blocked while converting")
        return refuse

    socket.socket.connect = _refuse("socket.connect")
    socket.socket.connect_ex = _refuse("socket.connect_ex")
    socket.create_connection = _refuse("socket.create_connection")
    os.system = _refuse("os.system")
    subprocess.Popen = _refuse("subprocess.Popen")

    def _report():
        if attempts:
            os.write(2, ("blocked: " + ", ".join(attempts) + "\\n").encode())
            os._exit(3)

    import atexit
    atexit.register(_report)
""")
_CONVERT = "import _tools, sys\n_tools.mnnconvert(['mnnconvert', *sys.argv[1:]])\n"


def mnn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("MNN") is not None and \
        importlib.util.find_spec("_tools") is not None


def mnn_convert(onnx_path: str, mnn_path: str, sparse: bool = False) -> str:
    """Convert an ONNX model to MNN with the converter's C extension, isolated (no
    telemetry, no pip, no network). ``sparse`` asks MNN to detect sparse weights and
    use its sparse convolutions where it expects a speed-up."""
    args = ["-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", mnn_path,
            "--bizCode", "npas-tvm"]
    if sparse:
        args.append("--detectSparseSpeedUp")
    done = subprocess.run([sys.executable, "-c", GUARD + _CONVERT, *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.exists(mnn_path):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"MNN conversion of {onnx_path} failed: {' | '.join(tail)}")
    return mnn_path


def mnn_engine(mnn_path: str, inputs: dict[str, np.ndarray], output: str,
               threads: int) -> Callable[[], np.ndarray]:
    """MNN's module API on the CPU backend, fp32 ("high" precision)."""
    import MNN
    import MNN.expr as F

    runtime = MNN.nn.create_runtime_manager(({"backend": "CPU", "numThread": threads,
                                              "precision": "high"},))
    names = list(inputs)
    net = MNN.nn.load_module_from_file(mnn_path, names, [output], runtime_manager=runtime)
    args = [F.const(np.ascontiguousarray(value), list(value.shape), F.NCHW)
            for value in inputs.values()]

    def run() -> np.ndarray:
        result = net.forward(args if len(args) > 1 else args[0])
        result = result[0] if isinstance(result, (list, tuple)) else result
        return np.asarray(F.convert(result, F.NCHW).read())

    return run


def ort_engine(onnx_path: str, inputs: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    from npas_tvm.runtime import ort_session

    session = ort_session(onnx_path)
    return lambda: session.run(None, inputs)[0]


def torch_engine(zoo_name: str, inputs: dict[str, np.ndarray], threads: int):
    """PyTorch eager on the zoo's module (dense; eager does not exploit zeros)."""
    import torch

    from npas_tvm.zoo import build_model

    torch.set_num_threads(threads)
    model = build_model(zoo_name).eval()
    tensors = [torch.from_numpy(value) for value in inputs.values()]

    def run() -> np.ndarray:
        with torch.inference_mode():
            return model(*tensors).numpy()

    return run


def tvm_engine(library: str, input_names: list[str], inputs: dict[str, np.ndarray]):
    from npas_tvm.runtime import TVMRunner

    runner = TVMRunner(library, input_names)
    tensors = runner.tensors(inputs)
    return lambda: runner.vm["main"](*tensors)


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
