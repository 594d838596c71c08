"""The TIR lowering pipeline for CPU builds: TVM's, plus small local buffers on the stack.

TVM lowers a constant-size allocation to a stack ``alloca`` only below 1 KiB
(``kMaxStackAlloca``); anything bigger becomes a ``TVMBackendAllocWorkspace`` heap
buffer, which LLVM cannot promote to registers. A register tile is such a buffer
(``cache_write`` to ``local``): the pattern kernel's 9 entries x 48 pixels of
accumulators (1.7 KiB on AVX-512) would then be stored and reloaded around every
pattern's loop instead of staying in the 32 vector registers (0.81 ms instead of 0.88
ms on a 3x3 128->128 conv at 28x28 pruned 3x). :class:`KeepLocalTilesOnStack` marks
``local`` allocations up to a few KiB so that TVM leaves them as allocas.

``tvm.compile(..., tir_pipeline=cpu_pipeline())`` or ``tvm.tirx.build(...,
pipeline=cpu_pipeline())`` selects it.
"""

from __future__ import annotations

CPU_PIPELINE = "npas_cpu"
MAX_STACK_TILE_BYTES = 4096


def _local_bytes(buffer) -> int | None:
    """Bytes of a ``local`` buffer of constant shape (None otherwise)."""
    import tvm

    scope = buffer.scope() if callable(getattr(buffer, "scope", None)) else ""
    if scope != "local":
        return None
    elements = 1
    for extent in buffer.shape:
        if not isinstance(extent, tvm.prim.IntImm):
            return None
        elements *= int(extent)
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return elements * dtype.bits * dtype.lanes // 8


def KeepLocalTilesOnStack(max_bytes: int = MAX_STACK_TILE_BYTES):  # noqa: N802 (a pass)
    """Mark ``local`` allocations of at most ``max_bytes`` so they stay stack allocas."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def mutate(node, mutator):
        node = mutator.default_mutate(node)
        size = _local_bytes(node.buffer)
        if size is None or size > max_bytes:
            return node
        annotations = dict(node.annotations or {})
        annotations["disable_lower_builtin"] = tirx.IntImm("bool", 1)
        return tirx.AllocBuffer(node.buffer, annotations)

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="KeepLocalTilesOnStack")
    def keep(func, _mod, _ctx):
        return func.with_body(tvm_ffi.structural_mutate(func.body,
                                                        [(tirx.AllocBuffer, mutate)]))

    return keep


def _cpu_pipeline():
    import tvm
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, finalize_host, finalize_device = default_s_tir_pipeline()
    return (tvm.transform.Sequential([lower, KeepLocalTilesOnStack()]), finalize_host,
            finalize_device)


def cpu_pipeline() -> str:
    """The name to pass as ``tir_pipeline`` for llvm targets (registered with TVM on
    each call: a dict entry, idempotent)."""
    from tvm.tirx.compilation_pipeline import register_tir_pipeline

    register_tir_pipeline(CPU_PIPELINE, _cpu_pipeline)
    return CPU_PIPELINE
