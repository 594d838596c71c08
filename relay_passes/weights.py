"""The prunable layers of a Relax function, and the weight values attached to it.

The ONNX frontend, asked to keep parameters (``keep_params_in_input=True``), makes every
initializer a parameter of ``main`` named as in the ONNX file and attaches the values
as the function's ``"params"`` attribute (the TVM convention that ``BindParams`` and
``detach_params`` follow). A weight is *constant* when it is such a parameter: its name
is the plan's key, and its value can be read, pruned and packed at compile time.

A prunable layer is a ``conv2d`` or a ``matmul`` whose weight is a constant parameter,
possibly seen through the ``permute_dims`` the frontend puts on a Gemm weight, or the
``layout_transform`` that a layout pass puts on a conv weight::

    w_t = R.permute_dims(fc_weight, axes=[1, 0])      # Gemm(transB=1): stored [out, in]
    y = R.matmul(x, w_t)                               # -> WeightUse("fc_weight", fc)

Weights are handed to the schemes in their layout: conv ``[F, C/groups, kh, kw]``, GEMM
``[out, in]`` (:meth:`WeightUse.to_scheme_layout`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

import tvm
from tvm import relax

from npas_tvm.layers import conv_kind
from npas_tvm.schemes import FC, SchemeSpec, spec_from_json

PRUNING_ATTR = "npas_pruning"
"""``main``'s attribute holding the annotations: weight name -> the spec as JSON text."""


def attached_params(func: relax.Function) -> dict[str, np.ndarray]:
    """The values attached to ``func``'s weight parameters, by parameter name."""
    attrs = func.attrs
    if attrs is None or "params" not in attrs:
        return {}
    num_input = int(attrs["num_input"])
    return {var.name: value.numpy()
            for var, value in zip(func.params[num_input:], attrs["params"])}


def with_attached_params(func: relax.Function,
                         updates: dict[str, np.ndarray]) -> relax.Function:
    """``func`` with some attached weight values replaced (same shapes and dtypes)."""
    num_input = int(func.attrs["num_input"])
    values = list(func.attrs["params"])
    for index, var in enumerate(func.params[num_input:]):
        if var.name in updates:
            new = np.ascontiguousarray(updates[var.name], dtype=values[index].dtype)
            assert tuple(new.shape) == tuple(values[index].shape), var.name
            values[index] = tvm.runtime.tensor(new)
    return func.with_attr("params", values)


def has_main(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` has the ``main`` function the pruning passes work on."""
    return "main" in [gv.name_hint for gv in mod.get_global_vars()]


def update_main(mod: tvm.IRModule, update) -> tvm.IRModule:
    """A copy of ``mod`` with ``main`` replaced by ``update(main)`` (if it has one)."""
    if not has_main(mod):
        return mod
    mod = mod.clone()  # a pass leaves its input module as it was
    mod["main"] = update(mod["main"])
    return mod


def BindAttachedParams() -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Bind ``main``'s attached weight values as constants (and drop the attribute).

    The graph passes read and rewrite weights while they are named parameters; the
    build wants constants. Unused bindings (a pruned layer's original weight, once its
    packed copy replaced it) are removed.
    """

    @tvm.transform.module_pass(opt_level=0, name="BindAttachedParams")
    def bind(mod, ctx):
        if not has_main(mod):
            return mod
        func = mod["main"]
        values = attached_params(func)
        if not values:
            return mod
        mod = relax.transform.BindParams(
            "main", {name: tvm.runtime.tensor(value) for name, value in values.items()})(mod)
        func = mod["main"]
        mod["main"] = func.without_attr("params").with_attr("num_input", len(func.params))
        return relax.transform.DeadCodeElimination()(mod)

    return bind


@dataclass(frozen=True)
class WeightUse:
    """One prunable layer: a conv2d/matmul call reading a constant weight parameter."""

    name: str                # the weight parameter (the ONNX initializer, the plan key)
    op: str                  # "conv2d" or "matmul"
    kind: str                # a schemes layer kind: conv, conv1x1, depthwise, grouped, fc
    weight_shape: tuple[int, ...]  # in the schemes' layout
    transposed: bool         # matmul(x, w) with w stored [in, out]
    call: relax.Call
    var: relax.Var           # the variable the call is bound to

    @property
    def groups(self) -> int:
        return int(self.call.attrs.groups) if self.op == "conv2d" else 1

    def to_scheme_layout(self, stored: np.ndarray) -> np.ndarray:
        return stored.T if self.transposed else stored

    def from_scheme_layout(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transposed else array


def bindings(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Every variable binding of ``func``'s body (dataflow or not)."""
    found = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                found[binding.var] = binding.value
    return found


def is_op(expr, name: str) -> bool:
    """Whether ``expr`` is a call of the Relax operator ``name`` (e.g. "relax.add")."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
        and expr.op.name == name


def _through(expr, bound: dict, op: str):
    """The argument of ``op`` if ``expr`` is (a variable bound to) a call of it."""
    value = bound.get(expr, expr) if isinstance(expr, relax.Var) else expr
    return value.args[0] if is_op(value, op) else None


def static_shape(expr) -> tuple[int, ...] | None:
    """The shape of a tensor expression if every dimension is a constant, else None."""
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return tuple(int(v) for v in values)


def weight_uses(func: relax.Function) -> Iterator[WeightUse]:
    """The prunable layers of ``func``, in program order."""
    attrs = func.attrs
    if attrs is None or "num_input" not in attrs:
        return
    weights = {var: var.name for var in func.params[int(attrs["num_input"]):]}
    if "params" not in attrs:
        return
    bound = bindings(func)
    for var, value in bound.items():
        if is_op(value, "relax.nn.conv2d"):
            weight = value.args[1]
            source = _through(weight, bound, "relax.layout_transform")
            weight = weight if source is None else source
            shape = static_shape(weight) if weight in weights else None
            if shape is None or len(shape) != 4:
                continue
            groups = int(value.attrs.groups)
            yield WeightUse(weights[weight], "conv2d", conv_kind(shape, groups), shape,
                            False, value, var)
        elif is_op(value, "relax.matmul"):
            weight, transposed = value.args[1], True
            inner = _through(weight, bound, "relax.permute_dims")
            if inner is not None:
                permute = bound.get(weight, weight)
                axes = permute.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    continue
                weight, transposed = inner, False
            shape = static_shape(weight) if weight in weights else None
            if shape is None or len(shape) != 2:
                continue
            yield WeightUse(weights[weight], "matmul", FC,
                            shape[::-1] if transposed else shape, transposed, value, var)


def pruning_annotations(func: relax.Function) -> dict[str, SchemeSpec]:
    """The annotations on ``func``: weight name -> spec (empty if none)."""
    attrs = func.attrs
    if attrs is None or PRUNING_ATTR not in attrs:
        return {}
    return {str(name): spec_from_json(json.loads(str(text)))
            for name, text in attrs[PRUNING_ATTR].items()}


def with_annotations(func: relax.Function, specs: dict[str, SchemeSpec]) -> relax.Function:
    """``func`` annotated with ``specs`` (replacing its annotations)."""
    return func.with_attr(PRUNING_ATTR, {name: json.dumps(spec.to_json())
                                         for name, spec in specs.items()})
