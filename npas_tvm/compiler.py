"""The compile driver: ONNX -> Relax -> (graph passes) -> build -> exported library.

Weights are imported as named parameters of ``main`` (named after their ONNX
initializers, the plan's keys), so graph passes can find each layer's weight by name;
they are bound as constants right before the build.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from npas_tvm.errors import ModelError, NpasError
from npas_tvm.model_io import LoadedModel
from npas_tvm.targets import TargetSpec, check_cross_compiler


@dataclass
class RelaxModel:
    """A Relax module whose weights are still named parameters of ``main``, their
    values attached to it (``main.attrs["params"]``, TVM's convention)."""

    mod: "object"  # tvm.IRModule
    input_names: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The weight values by name (the ONNX initializer names)."""
        from relay_passes.weights import attached_params

        return attached_params(self.mod["main"])


def import_onnx(model: LoadedModel) -> RelaxModel:
    """Import with TVM's Relax ONNX frontend, keeping weight names as parameters."""
    from tvm.relax.frontend.onnx import from_onnx

    log, failure = io.StringIO(), None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            mod = from_onnx(model.proto, shape_dict=dict(model.input_shapes),
                            dtype_dict=dict(model.input_dtypes), keep_params_in_input=True)
    except Exception as err:  # the frontend raises TVMError/ValueError/KeyError
        message = " ".join(str(err).split())[:300] or type(err).__name__
        failure = f"{_failing_node(model.proto, log.getvalue())}TVM's ONNX frontend failed: {message}"
        with _native_stderr_silenced():  # the half-built module's destructor warns
            err.__traceback__ = None  # frees the frontend's frames, and the module, now
            gc.collect()
    if failure is not None:
        raise ModelError(f"{model.path}: {failure}")
    func = mod["main"]
    num_inputs = int(func.attrs["num_input"])
    return RelaxModel(mod, [var.name for var in func.params[:num_inputs]])


def _failing_node(proto, frontend_log: str) -> str:
    """Name the node the frontend failed on, from its "Error converting operator" line."""
    found = re.search(r"Error converting operator (\w+), with inputs: \[(.*)\]", frontend_log)
    if not found:
        return ""
    op_type = found.group(1)
    inputs = [name.strip() for name in found.group(2).split(",")]
    for index, node in enumerate(proto.graph.node):
        sanitized = [re.sub(r"[^0-9A-Za-z_]", "_", name) for name in node.input if name]
        if node.op_type == op_type and sanitized[: len(inputs)] == inputs:
            return f"node {node.name or index!r} ({op_type}): "
    return f"a {op_type} node: "


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silence C++ log lines written straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def bind_params(relax_model: RelaxModel):
    """Turn the weight parameters into constants (the form TVM's own passes expect)."""
    from relay_passes.weights import BindAttachedParams

    return BindAttachedParams()(relax_model.mod)


def build(mod, spec: TargetSpec, passes: Sequence = (), dense_schedules: bool = True,
          on_layer=None, tuning_db=None):
    """Build a Relax module for ``spec`` and return the VM executable.

    ``mod``'s weights may still be attached parameters (:func:`import_onnx`); they are
    bound as constants inside the pipeline, after ``passes`` and the sparse lowering.
    CPU (llvm) targets run npas-tvm's CPU pipeline: annotated layers become sparse
    kernels (``on_layer`` gets a :class:`relay_passes.LoweredLayer` per layer), the
    rest blocked layouts and scheduled kernels for conv2d, dense, pooling and their
    fused epilogues (:func:`relay_passes.dense_cpu_pipeline`); ``dense_schedules=False``
    keeps TVM's default Relax pipeline (the unscheduled baseline). OpenCL targets get
    TVM's GPU pipeline with the sparse kernels' OpenCL schedules
    (:func:`relay_passes.gpu.gpu_pipeline`); dlight's default GPU rules schedule the rest.
    ``tuning_db`` (a :class:`npas_tvm.tuning.TuningDatabase`, CPU targets) replaces the
    default schedules of the kernels it has tuned records for.
    """
    import tvm
    from tvm import relax

    from relay_passes.weights import BindAttachedParams

    target = spec.tvm_target
    if dense_schedules and target.kind.name == "llvm":
        from relay_passes import dense_cpu_pipeline

        pipeline = tvm.transform.Sequential([*passes,
                                             dense_cpu_pipeline(spec, on_layer, tuning_db)])
    elif dense_schedules and target.kind.name == "opencl":
        from relay_passes.gpu import gpu_pipeline

        pipeline = tvm.transform.Sequential([*passes, gpu_pipeline(spec, on_layer)])
    else:
        from relay_passes.lower_sparse import LowerToSparseKernels

        pipeline = tvm.transform.Sequential([
            *passes, LowerToSparseKernels(spec, on_layer), BindAttachedParams(),
            relax.get_default_pipeline(target)])
    kwargs = {}
    if target.kind.name == "llvm":  # register tiles over 1 KiB stay on the stack
        from tir_schedules.lowering import cpu_pipeline

        kwargs["tir_pipeline"] = cpu_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.compile(mod, target, relax_pipeline=pipeline, **kwargs)


def export(executable, path: str, spec: TargetSpec, cc: str | None = None) -> str:
    """Write the library: ``.so`` (linked for the target), or ``.tar`` (objects only)."""
    from tvm.support import cc as tvm_cc

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if path.endswith(".tar"):
        executable.export_library(path)
        return path
    if not path.endswith((".so", ".dylib")):
        raise NpasError(f"-o {path}: the output must end in .so or .tar")
    linker = check_cross_compiler(spec, cc)
    kwargs = {"fcompile": tvm_cc.cross_compiler(linker)} if linker else {}
    executable.export_library(path, **kwargs)
    return path


def compile_model(model: LoadedModel, spec: TargetSpec, passes: Sequence = (),
                  tuning_db=None):
    """ONNX model -> VM executable for ``spec``."""
    return build(import_onnx(model).mod, spec, passes, tuning_db=tuning_db)


def library_kinds(executable) -> list[str]:
    """Kinds of the modules in a built library (``llvm``, ``opencl``...)."""
    kinds, stack = [], [executable.mod]
    while stack:
        module = stack.pop()
        kinds.append(module.kind)
        stack.extend(module.imports)
    return kinds


def opencl_source(executable) -> str:
    """The OpenCL C of a library built for an OpenCL target ("" if none)."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "opencl":
            return module.inspect_source()
        stack.extend(module.imports)
    return ""
