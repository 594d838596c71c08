"""Filter pruning as a graph rewrite: removed filters leave smaller dense layers.

A filter-pruned conv needs no sparse kernel: its removed output channels, and the
consumers' matching input channels, are cut out of the weights, so the layers stay
dense and get smaller. That is exact only where a removed channel is exactly zero all
the way to its consumers: :class:`~relay_passes.apply_pruning.ApplyPruning` zeroes the
removed filters' biases, and the path may pass only ops that keep a zero channel zero
(bias add, ReLU, a clamp whose bounds hold 0, pooling, global mean, the flatten after
it), and a channel concat (the channels keep their place among the other inputs', and
the consumer loses those at their offset). Where the channel meets anything else (a
residual add) the layer keeps its zero filters, with a warning.

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
    """One filter-pruned layer and what its removal touches. Each record carries the
    keep mask of its channel space: the layer's filters, or a concat's output channels
    (the layer's among the other inputs', which are all kept)."""

    use: WeightUse
    kept: np.ndarray
    biases: list = field(default_factory=list)      # (param, mask): sliced on the channels
    consumers: list = field(default_factory=list)   # (param, axis, mask)
    reshapes: list = field(default_factory=list)    # (var, mask): target shape shrinks
    depthwise: list[str] = field(default_factory=list)    # convs whose groups shrink
    folds: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (bias, added)
    problem: str = ""


def _users(bound: dict) -> dict:
    users: dict = {}
    for var, value in bound.items():
        if isinstance(value, relax.Call):
            args = value.args[1].fields if is_op(value, "relax.call_tir") else value.args
            for arg in args:
                for item in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                    if isinstance(item, relax.Var):
                        users.setdefault(item, []).append(var)
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
        """Follow the removed channels. A path is (variable, state, keep mask): the
        state is None while the removed channels are zero, else the constant each holds
        (past a depthwise conv); the mask is over the variable's channels."""
        self.pruned = pruned
        stack, seen = [(removal.use.var, None, removal.kept)], set()
        while stack and not removal.problem:
            var, state, mask = stack.pop()
            for user in self.users.get(var, []):
                if user in seen:
                    continue
                seen.add(user)
                removal.problem = self._step(removal, var, state, mask, user, stack)
                if removal.problem:
                    return

    def _consume(self, removal: _Removal, consumer: WeightUse, state, mask) -> str:
        if consumer.op == "conv2d" and consumer.groups != 1:
            if consumer.kind != "depthwise" or state is not None or \
                    mask is not removal.kept:
                return f"its output feeds the grouped conv {consumer.name!r}"
            if consumer.name in self.pruned:
                return f"the depthwise conv {consumer.name!r} is pruned too"
            removal.consumers.append((consumer.name, 0, mask))
            removal.depthwise.append(consumer.name)
            return ""
        axis = 1 if consumer.op == "conv2d" or not consumer.transposed else 0
        removal.consumers.append((consumer.name, axis, mask))
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
        removal.folds.append((biases[0], matrix[:, ~mask].astype(np.float64) @ state))
        return ""

    def _concat(self, removal: _Removal, var, state, mask, user, stack) -> str:
        """A channel concat: the removed channels keep their place among the others'."""
        value = self.bound[user]
        parts = value.args[0].fields
        ndim = len(value.ty.shape.values)
        if int(value.attrs.axis) % ndim != 1 or sum(p.same_as(var) for p in parts) != 1:
            return "its output meets a concat along another axis"
        sizes = [int(p.ty.shape.values[1]) for p in parts]
        at = [p.same_as(var) for p in parts].index(True)
        wide = np.ones(sum(sizes), bool)
        wide[sum(sizes[:at]):sum(sizes[:at + 1])] = mask
        stack.append((user, state, wide))
        return ""

    def _step(self, removal: _Removal, var, state, mask, user, stack) -> str:
        value = self.bound[user]
        consumer = self.weights.get(user)
        if consumer is not None and value.args[0].same_as(var):
            problem = self._consume(removal, consumer, state, mask)
            if not problem and consumer.name in removal.depthwise:
                stack.append((user, np.zeros(int((~mask).sum())), mask))
            return problem
        if is_op(value, "relax.concat"):
            return self._concat(removal, var, state, mask, user, stack)
        if is_op(value, "relax.add"):
            other = value.args[1] if value.args[0].same_as(var) else value.args[0]
            name = self.param_of(other)
            if name is None or self.values[name].size != len(mask):
                return "its output meets a residual add or another tensor"
            removal.biases.append((name, mask))
            if other not in self.params:
                removal.reshapes.append((other, mask))
            if state is not None:
                state = state + self.values[name].reshape(-1)[~mask]
            stack.append((user, state, mask))
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
            stack.append((user, state, mask))
            return ""
        if is_op(value, "relax.mean") and [int(a) for a in value.attrs.axis] == [2, 3]:
            stack.append((user, state, mask))
            return ""
        if is_op(value, "relax.reshape"):
            shape = [int(v) for v in value.args[0].ty.shape.values]
            if len(shape) == 4 and shape[2:] == [1, 1]:
                removal.reshapes.append((user, mask))
                stack.append((user, state, mask))
                return ""
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) \
                and value.op.name in _CHANNEL_OPS:
            if state is not None and value.op.name != "relax.nn.relu":
                return (f"its channels pass {value.op.name} as constants past a depthwise "
                        "conv")
            stack.append((user, None if state is None else np.maximum(state, 0), mask))
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
        keeps: dict = {}          # (param, axis) -> keep mask
        reshape_keeps: dict = {}  # (reshape var, 0) -> keep mask
        folds: dict = {}          # bias -> constant added
        depthwise: list = []
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
            out_axis = 1 if use.transposed else 0
            _narrow(keeps, use.name, out_axis, removal.kept)
            for name, mask in removal.biases:
                _narrow(keeps, name, min(values[name].ndim - 1, 1), mask)
            for name, axis, mask in removal.consumers:
                _narrow(keeps, name, axis, mask)
            for var, mask in removal.reshapes:
                _narrow(reshape_keeps, var, 0, mask)
            for name, delta in removal.folds:
                folds[name] = folds.get(name, 0) + delta
            depthwise += removal.depthwise
            removed.append((use, spec, macs))
        # folds into the full biases first, then every cut at once (masks of one
        # parameter, from several layers meeting at a concat, are combined)
        for name, delta in folds.items():
            shrunk[name] = (values[name] + delta.reshape(values[name].shape)).astype(
                values[name].dtype)
        for (name, axis), mask in keeps.items():
            shrunk[name] = np.compress(mask, shrunk.get(name, values[name]), axis=axis)
        for (var, _), mask in reshape_keeps.items():
            reshapes.append((tracer.bound[var], len(mask), int(mask.sum())))
        regroup = {name: shrunk[name].shape[0] for name in depthwise}
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


def _narrow(keeps: dict, name, axis: int, mask: np.ndarray) -> None:
    key = (name, axis)
    keeps[key] = keeps[key] & mask if key in keeps else mask.copy()


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
