"""Loading ONNX models with clear errors, and fixing their input shapes.

Everything a user can get wrong about a model file is checked here, before TVM sees
it, so that the error names the file, the input or the node at fault in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from npas_tvm.errors import ModelError, NpasError

SUPPORTED_OPSETS = range(13, 22)  # 13..21 are tested; others load with a warning


@dataclass
class LoadedModel:
    """An ONNX model whose graph inputs all have static shapes."""

    path: str
    proto: "object"  # onnx.ModelProto, with external data loaded
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    opset: int

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {name: rng.standard_normal(shape).astype(self.input_dtypes[name])
                for name, shape in self.input_shapes.items()}


def parse_input_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape name=1,3,224,224`` flags."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise NpasError(f"--input-shape {item!r}: expected NAME=D1,D2,... with positive "
                            "integers, e.g. input=1,3,224,224") from None
        shapes[name] = shape
    return shapes


def _onnx_dtype_name(elem_type: int) -> str:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def load_onnx(path: str, input_shapes: dict[str, tuple[int, ...]] | None = None,
              check_ops: bool = True) -> LoadedModel:
    """Load ``path`` (external data included), fix its input shapes, check it imports."""
    import onnx

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    try:
        proto = onnx.load(path, load_external_data=True)
    except FileNotFoundError as err:
        raise ModelError(f"{path}: external data file missing: {err.filename or err}") from None
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'cannot parse'})") from None
    if not proto.graph.node:
        raise ModelError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset not in SUPPORTED_OPSETS:
        import warnings

        warnings.warn(f"{path}: opset {opset} is outside the tested range 13-21", stacklevel=2)
    shapes, dtypes = _fix_input_shapes(path, proto, input_shapes or {})
    if check_ops:
        _check_supported_ops(path, proto)
    _check_shapes_infer(path, proto)
    return LoadedModel(path, proto, shapes, dtypes, opset)


def graph_inputs(proto) -> list:
    """The real inputs of the graph (initializers listed as inputs are excluded)."""
    initializers = {init.name for init in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _fix_input_shapes(path: str, proto, given: dict[str, tuple[int, ...]]):
    inputs = graph_inputs(proto)
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise ModelError(f"{path}: --input-shape names {name!r}, but the model's inputs "
                             f"are {', '.join(names)}")
    shapes, dtypes = {}, {}
    for value in inputs:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if value.name in given:
            shape = given[value.name]
            if len(shape) != len(dims):
                raise ModelError(f"{path}: input {value.name!r} has rank {len(dims)}, but "
                                 f"--input-shape gives {len(shape)} dims")
            for axis, (dim, want) in enumerate(zip(dims, shape)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                    raise ModelError(f"{path}: input {value.name!r} dim {axis} is fixed to "
                                     f"{dim.dim_value}, --input-shape gives {want}")
        else:
            shape = []
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    shape.append(dim.dim_value)
                elif axis == 0:
                    shape.append(1)  # a dynamic batch: compile for batch 1
                else:
                    label = dim.dim_param or "?"
                    raise ModelError(f"{path}: input {value.name!r} dim {axis} ({label}) is "
                                     f"dynamic; fix it with --input-shape {value.name}=...")
            shape = tuple(shape)
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = size
        shapes[value.name] = tuple(shape)
        dtypes[value.name] = _onnx_dtype_name(tensor_type.elem_type)
    # Intermediate value_info may carry the old symbolic batch; let inference redo it.
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    return shapes, dtypes


def _check_supported_ops(path: str, proto) -> None:
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:  # private helper moved: let the frontend report it
        return
    known = set(_get_convert_map()) | {"If", "Constant"}
    for index, node in enumerate(proto.graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise ModelError(f"{path}: node {node.name or index!r} ({node.domain}::"
                             f"{node.op_type}) is from a custom domain TVM cannot import")
        if node.op_type not in known:
            raise ModelError(f"{path}: node {node.name or index!r} uses op {node.op_type}, "
                             "which TVM's ONNX frontend cannot import")


def _check_shapes_infer(path: str, proto) -> None:
    """Run ONNX shape inference strictly so a shape that does not fit names its node."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        message = " ".join(str(err).split())
        raise ModelError(f"{path}: shapes do not fit: {message}") from None
    except ValueError:
        return  # models over 2 GB: onnx cannot infer in memory; TVM will check
    del inferred
