"""Turn the frontend's opaque clamp kernels back into Relax operators.

The ONNX frontend imports ``Clip`` with min/max inputs (opset >= 11, e.g. ReLU6) as
``call_tir`` of a TE ``maximum``/``minimum`` kernel. A ``call_tir`` is opaque to
``ConvertLayout``, so every ReLU6 would pull the tensor back to ``NCHW`` between two
blocked convolutions. As ``R.maximum``/``R.minimum`` they are ordinary elementwise
ops: the layout flows through them and fusion still puts them in the conv's epilogue.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax


def _clamp_kind(func) -> str | None:
    """``"maximum"``/``"minimum"`` if ``func`` is ``out[i] = max|min(A[i], B[()])``."""
    if not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 3:
        return None
    stores: list = []

    def on_store(node, visitor):
        stores.append(node)

    tvm_ffi.structural_visit(func.body, [(tvm.tirx.BufferStore, on_store)])
    if len(stores) != 1:
        return None
    store, (a_var, b_var, out_var) = stores[0], func.params
    kinds = {tvm.tirx.Max: "maximum", tvm.tirx.Min: "minimum"}
    kind = kinds.get(type(store.value))
    if kind is None or not store.buffer.same_as(out_var):
        return None
    first, second = store.value.a, store.value.b
    source = [getattr(load, "source", getattr(load, "buffer", None)) for load in (first, second)]
    if not (source[0] is not None and source[0].same_as(a_var)
            and source[1] is not None and source[1].same_as(b_var)
            and len(second.indices) == 0 and len(first.indices) == len(store.indices)
            and all(x.same_as(y) for x, y in zip(first.indices, store.indices))):
        return None
    return kind


@relax.expr_functor.mutator
class _ClampRewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return call
        callee, args = call.args[0], call.args[1]
        if not isinstance(callee, tvm.ir.GlobalVar) or not isinstance(args, tvm.ir.Tuple):
            return call
        kind = _clamp_kind(self.mod_[callee])
        if kind is None or len(args.fields) != 2:
            return call
        data, bound = args.fields
        if not isinstance(bound, tvm.ir.GenericConst) or bound.value.numpy().ndim != 0:
            return call
        return getattr(relax.op, kind)(data, bound)


@tvm.transform.module_pass(opt_level=0, name="ClampCallTIRToOps")
class ClampCallTIRToOps:
    """Rewrite ``call_tir`` of elementwise max/min-with-a-scalar kernels to Relax ops.

    Example::

        lv = R.call_tir(cls.maximum, (x, R.const(0.0)), out_ty=...)
        # becomes
        lv = R.maximum(x, R.const(0.0))
    """

    def transform_module(self, mod, ctx):
        rewriter = _ClampRewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
