"""Filter pruning as a graph rewrite: removed filters leave smaller dense layers.

A filter-pruned conv needs no sparse kernel: its removed output channels, and the
consumers' matching input channels, are cut out of the weights, so the layers stay
dense and get smaller. That is exact only where a removed channel is exactly zero all
the way to its consumers: :class:`~relay_passes.apply_pruning.ApplyPruning` zeroes the
removed filters' biases, and the path may pass only ops that keep a zero channel zero
(bias add, ReLU, a clamp whose bounds hold 0, pooling, global mean, the flatten after
it). Where the channel meets anything else (a residual add, a concat) the layer keeps
its zero filters, with a warning.

A depthwise conv on the path (MobileNet's expand -> depthwise -> project) loses the same
channels. Its bias makes a removed channel a constant map, ``k = act(bias)``, which the
next 1x1 conv or FC turns into the constant ``W[:, removed] @ k``: that is folded into
the consumer's bias, so the result is exactly the pruned model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from relay_passes.canonicalize import _clamp_kind
from relay_passes.weights import (WeightUse, attached_params, bindings, has_main, is_op,
                                  pruning_annotations, weight_uses, with_annotations)

_log = logging.getLogger("npas_tvm")

_CHANNEL_OPS = {"relax.nn.relu", "relax.nn.max_pool2d", "relax.nn.avg_pool2d",
                "relax.nn.adaptive_avg_pool2d"}


def kept_filters(weight: np.ndarray) -> np.ndarray:
    """Filters (output channels) with any nonzero weight."""
    return (weight.reshape(weight.shape[0], -1) != 0).any(axis=1)


@dataclass
class _Removal:
    """One filter-pruned layer and what its removal touches."""

    use: WeightUse
    kept: np.ndarray
    biases: list[str] = field(default_factory=list)       # params sliced on axis 0
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (param, axis)
    reshapes: list[relax.Var] = field(default_factory=list)  # whose target shape shrinks
    depthwise: list[str] = field(default_factory=list)    # convs whose groups shrink
    folds: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (bias, added)
    problem: str = ""


def _users(bound: dict) -> dict:
    users: dict = {}
    for var, value in bound.items():
        if isinstance(value, relax.Call):
            args = value.args[1].fields if is_op(value, "relax.call_tir") else value.args
            for arg in args:
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, []).append(var)
    return users


class _Tracer:
    """Follows a removed channel from a layer's output to its consumers."""

    def __init__(self, mod, func, values: dict):
        self.mod, self.values = mod, values
        self.bound = bindings(func)
        self.users = _users(self.bound)
        self.params = {var: var.name for var in func.params}
        self.weights = {use.var: use for use in weight_uses(func)}

    def scalar(self, expr) -> float | None:
        """The value of a scalar operand, through the frontend's NaN guard."""
        if isinstance(expr, tvm.ir.GenericConst):
            return float(expr.value.numpy())
        if expr in self.params and self.params[expr] in self.values:
            return float(self.values[self.params[expr]])
        value = self.bound.get(expr)
        if is_op(value, "relax.where") and is_op(self.bound.get(value.args[0]), "relax.isnan"):
            return self.scalar(value.args[2])
        return None

    def param_of(self, expr) -> str | None:
        """The parameter behind ``expr`` (directly, or through a reshape)."""
        if expr in self.params:
            return self.params[expr]
        value = self.bound.get(expr)
        if is_op(value, "relax.reshape") and value.args[0] in self.params:
            return self.params[value.args[0]]
        return None

    def trace(self, removal: _Removal, pruned: set) -> None:
        """Follow the removed channels; a state is None while they are zero, else the
        constant each removed channel holds (past a depthwise conv)."""
        self.pruned = pruned
        stack, seen = [(removal.use.var, None)], set()
        while stack and not removal.problem:
            var, state = stack.pop()
            for user in self.users.get(var, []):
                if user in seen:
                    continue
                seen.add(user)
                removal.problem = self._step(removal, var, state, user, stack)
                if removal.problem:
                    return

    def _consume(self, removal: _Removal, consumer: WeightUse, state) -> str:
        if consumer.op == "conv2d" and consumer.groups != 1:
            if consumer.kind != "depthwise" or state is not None:
                return f"its output feeds the grouped conv {consumer.name!r}"
            if consumer.name in self.pruned:
                return f"the depthwise conv {consumer.name!r} is pruned too"
            removal.consumers.append((consumer.name, 0))
            removal.depthwise.append(consumer.name)
            return ""
        axis = 1 if consumer.op == "conv2d" or not consumer.transposed else 0
        removal.consumers.append((consumer.name, axis))
        if state is None:
            return ""
        # the removed channels are constant maps: fold their contribution into the bias
        if consumer.op == "conv2d" and (tuple(consumer.weight_shape[2:]) != (1, 1) or any(
                int(p) for p in consumer.call.attrs.padding)):
            return (f"its channels reach {consumer.name!r} as constants past a depthwise "
                    "conv, which only a 1x1 conv without padding can fold")
        biases = filter_biases_of(self, consumer)
        if len(biases) != 1 or consumer.name in self.pruned:
            return (f"its channels reach {consumer.name!r} as constants past a depthwise "
                    "conv, and that layer has no bias to fold them into")
        weight = consumer.to_scheme_layout(self.values[consumer.name])
        matrix = weight.reshape(weight.shape[0], weight.shape[1], -1)[:, :, 0]
        removed = ~removal.kept
        removal.folds.append((biases[0], matrix[:, removed].astype(np.float64) @ state))
        return ""

    def _step(self, removal: _Removal, var, state, user, stack) -> str:
        value = self.bound[user]
        consumer = self.weights.get(user)
        if consumer is not None and value.args[0].same_as(var):
            problem = self._consume(removal, consumer, state)
            if not problem and consumer.name in removal.depthwise:
                stack.append((user, np.zeros(int((~removal.kept).sum()))))
            return problem
        if is_op(value, "relax.add"):
            other = value.args[1] if value.args[0].same_as(var) else value.args[0]
            name = self.param_of(other)
            if name is None or self.values[name].size != len(removal.kept):
                return "its output meets a residual add or another tensor"
            removal.biases.append(name)
            if other not in self.params:
                removal.reshapes.append(other)
            if state is not None:
                state = state + self.values[name].reshape(-1)[~removal.kept]
            stack.append((user, state))
            return ""
        if is_op(value, "relax.maximum") or is_op(value, "relax.minimum") or \
                is_op(value, "relax.call_tir"):
            kind = (value.op.name.split(".")[-1] if not is_op(value, "relax.call_tir")
                    else _clamp_kind(self.mod[value.args[0]]))
            operands = value.args if kind and not is_op(value, "relax.call_tir") \
                else value.args[1].fields
            bound = self.scalar(operands[1]) if kind else None
            if bound is None or (state is None and (
                    (kind == "maximum" and bound > 0) or (kind == "minimum" and bound < 0))):
                return "its output passes an op that makes a zero channel nonzero"
            if state is not None:
                state = np.maximum(state, bound) if kind == "maximum" else \
                    np.minimum(state, bound)
            stack.append((user, state))
            return ""
        if is_op(value, "relax.mean") and [int(a) for a in value.attrs.axis] == [2, 3]:
            stack.append((user, state))
            return ""
        if is_op(value, "relax.reshape"):
            shape = [int(v) for v in value.args[0].ty.shape.values]
            if len(shape) == 4 and shape[2:] == [1, 1]:
                removal.reshapes.append(user)
                stack.append((user, state))
                return ""
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) \
                and value.op.name in _CHANNEL_OPS:
            if state is not None and value.op.name != "relax.nn.relu":
                return (f"its channels pass {value.op.name} as constants past a depthwise "
                        "conv")
            stack.append((user, None if state is None else np.maximum(state, 0)))
            return ""
        what = value.op.name if isinstance(value, relax.Call) and isinstance(
            value.op, tvm.ir.Op) else "an op"
        return f"its output meets {what}, which does not keep a removed channel zero"


@relax.expr_functor.mutator
class _Shrinker(relax.PyExprMutator):
    """Re-emits the function over the sliced parameters; the reshapes on the removed
    channels' path get their new channel count (bindings get their new shapes)."""

    def __init__(self, mod, reshapes: list, regroup: dict):
        super().__init__(mod)
        self.mod_ = mod
        self.reshapes = reshapes    # [(reshape call, old channels, new channels)]
        self.regroup = regroup      # depthwise weight name -> its new channel count

    def visit_call_(self, call):
        if is_op(call, "relax.nn.conv2d") and isinstance(call.args[1], relax.Var) \
                and call.args[1].name in self.regroup:
            attrs = call.attrs
            return relax.op.nn.conv2d(
                self.visit_expr(call.args[0]), self.visit_expr(call.args[1]),
                strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                groups=self.regroup[call.args[1].name], data_layout=attrs.data_layout,
                kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout,
                out_dtype=attrs.out_dtype)
        for original, old, new in self.reshapes:
            if call.same_as(original):
                dims = [int(v) for v in call.args[1].values]
                dims[dims.index(old)] = new
                return relax.op.reshape(self.visit_expr(call.args[0]), dims)
        if is_op(call, "relax.call_tir"):  # a clamp kernel is shape-specialized: use the op
            kind = _clamp_kind(self.mod_[call.args[0]])
            if kind is not None:
                data, bound = (self.visit_expr(arg) for arg in call.args[1].fields)
                return getattr(relax.op, kind)(data, bound)
        return self.visit_expr_post_order(call)


def filter_biases(func, use: WeightUse) -> list[str]:
    """The bias parameters added right after a layer's output (one value per filter)."""
    return filter_biases_of(_Tracer(None, func, attached_params(func)), use)


def filter_biases_of(tracer: _Tracer, use: WeightUse) -> list[str]:
    found = []
    for user in tracer.users.get(use.var, []):
        value = tracer.bound[user]
        if is_op(value, "relax.add"):
            other = value.args[1] if value.args[0].same_as(use.var) else value.args[0]
            name = tracer.param_of(other)
            if name is not None and tracer.values[name].size == use.weight_shape[0]:
                found.append(name)
    return found


def RemoveFilters(on_layer=None) -> tvm.transform.Pass:  # pylint: disable=invalid-name
    """Cut the removed filters of ``filter``-annotated layers, and the matching input
    channels of their consumers, out of the weights (annotation dropped: the layers are
    dense). ``on_layer`` receives a :class:`~relay_passes.lower_sparse.LoweredLayer`
    per filter-annotated layer.

    Example::

        # conv1.weight: filter 2x -> 16 of 32 filters kept
        y = R.nn.conv2d(x, conv1_weight)        # conv1_weight: (32, 16, 3, 3)
        z = R.nn.conv2d(R.nn.relu(y + b), conv2_weight)     # conv2_weight: (24, 32, 1, 1)
        # becomes (conv1_weight: (16, 16, 3, 3), b: (16,), conv2_weight: (24, 16, 1, 1))
    """
    from relay_passes.lower_sparse import LoweredLayer, geometry_of

    report = on_layer or (lambda row: None)

    @tvm.transform.module_pass(opt_level=0, name="RemoveFilters")
    def remove(mod, ctx):
        if not has_main(mod):
            return mod
        func = mod["main"]
        specs = pruning_annotations(func)
        if not any(spec.scheme == "filter" for spec in specs.values()):
            return mod
        values = attached_params(func)
        tracer = _Tracer(mod, func, values)
        pruned = {name for name, spec in specs.items() if spec.scheme == "filter"}
        shrunk: dict = {}
        reshapes: list = []
        regroup: dict = {}
        removed: list = []
        for use in weight_uses(func):
            spec = specs.get(use.name)
            if spec is None or spec.scheme != "filter":
                continue
            macs = geometry_of(use).dense_macs()
            weight = use.to_scheme_layout(values[use.name])
            removal = _Removal(use, kept_filters(weight))
            if use.op == "conv2d" and use.groups != 1:
                removal.problem = "a grouped conv's groups would change"
            elif removal.kept.all():
                removal.problem = "no filter is all zeros"
            else:
                tracer.trace(removal, pruned)
            del specs[use.name]
            if removal.problem:
                _log.warning("layer %r (filter %gx): %s; it keeps its zero filters (dense)",
                             use.name, spec.rate, removal.problem)
                kept_macs = macs * int(removal.kept.sum()) // len(removal.kept)
                report(LoweredLayer(use.name, use.kind, spec, None, removal.problem, macs,
                                    kept_macs, macs))
                continue
            kept = removal.kept
            out_axis = 1 if use.transposed else 0
            shrunk[use.name] = np.compress(kept, shrunk.get(use.name, values[use.name]),
                                           axis=out_axis)
            for name in removal.biases:
                shrunk[name] = np.compress(kept, values[name], axis=min(values[name].ndim - 1, 1))
            for name, delta in removal.folds:  # before any slicing of that bias
                bias = shrunk.get(name, values[name])
                shrunk[name] = (bias + delta.reshape(bias.shape)).astype(bias.dtype)
            for name, axis in removal.consumers:
                shrunk[name] = np.compress(kept, shrunk.get(name, values[name]), axis=axis)
            for name in removal.depthwise:
                regroup[name] = shrunk[name].shape[0]
            for var in removal.reshapes:
                reshapes.append((tracer.bound[var], len(kept), int(kept.sum())))
            removed.append((use, spec, macs))
        for use, spec, macs in removed:  # MACs once every removal shrank the weights
            kept_macs = macs * shrunk[use.name].size // values[use.name].size
            report(LoweredLayer(use.name, use.kind, spec, "filters", "", macs, kept_macs,
                                kept_macs))
        func = with_annotations(func, specs)
        if shrunk:
            func = _replace_params(mod, func, shrunk, reshapes, regroup)
        mod = mod.clone()
        mod["main"] = func
        return mod

    return remove


def _replace_params(mod, func, shrunk: dict, reshapes: list, regroup: dict | None = None):
    """``func`` with the named parameters given new (smaller) values and shapes; the
    depthwise convs of ``regroup`` (weight name -> channels) get their new groups."""
    num_input = int(func.attrs["num_input"])
    params, values = list(func.params), list(func.attrs["params"])
    shrinker = _Shrinker(mod, reshapes, regroup or {})
    for index, var in enumerate(params):
        if var.name in shrunk and index >= num_input:
            value = np.ascontiguousarray(shrunk[var.name], dtype=values[index - num_input].dtype)
            new = relax.Var(var.name, relax.TensorType(value.shape, str(value.dtype)))
            shrinker.set_var_remap(var, new)
            params[index] = new
            values[index - num_input] = tvm.runtime.tensor(value)
    body = shrinker.visit_expr(func.body)
    return relax.Function(params, body, attrs=func.attrs).with_attr("params", values)
