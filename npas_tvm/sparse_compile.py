"""``compile --npas``: choose the pruning, prune, build sparse, and say what happened.

The pruning comes from a plan file, from the rule-based mapper (for the target: block
rows of its SIMD width, schemes that have a kernel there), or from the zeros a pruned
model already has (``DetectSparsity``). The pruned weights are written back into the
ONNX model beside the library (``OUT.pruned.onnx``): the same numbers the library was
built from, so anyone can check it against onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from npas_tvm.errors import NpasError
from npas_tvm.model_io import LoadedModel
from npas_tvm.schemes import RATE_TOLERANCE
from npas_tvm.targets import TargetSpec


def pruned_path(output: str) -> str:
    """``OUT.so`` -> ``OUT.pruned.onnx``."""
    root, _ = os.path.splitext(output)
    return root + ".pruned.onnx"


def is_pruned(proto, layers) -> bool:
    """Whether any prunable weight has more than 2% exact zeros."""
    from npas_tvm.pruning import load_weight, weight_arrays

    initializers = weight_arrays(proto)
    for layer in layers:
        weight = load_weight(initializers, layer)
        if np.count_nonzero(weight) < weight.size * (1.0 - RATE_TOLERANCE):
            return True
    return False


def annotate_pass(model: LoadedModel, spec: TargetSpec, npas: str, rate: float | None):
    """(the annotation pass, a description) for ``--npas`` and ``--rate``."""
    from npas_tvm.layers import extract_layers
    from relay_passes import AnnotatePruning, DetectSparsity

    layers = extract_layers(model.proto)
    if not layers:
        raise NpasError(f"{model.path}: --npas: no prunable layers (Conv, Gemm or MatMul "
                        "with a constant weight initializer)")
    mode = npas
    if mode == "auto":
        mode = "detect" if is_pruned(model.proto, layers) else "rule"
    if mode == "detect":
        if rate is not None:
            raise NpasError("--rate applies to --npas rule; a pruned model's zeros set its "
                            "rates (--npas detect)")
        return DetectSparsity(), "schemes detected from the weights' zeros"
    if mode == "rule":
        from search.rule_mapper import RuleTarget, rule_plan

        rate = 3.0 if rate is None else rate
        plan = rule_plan(layers, rate, RuleTarget.for_spec(spec))
        return AnnotatePruning(plan), f"rule-based plan at {rate:g}x for {spec.name}"
    from npas_tvm.plan import load_plan, validate_plan

    plan = load_plan(mode)
    validate_plan(plan, layers, mode)
    return AnnotatePruning(plan), f"plan {mode}"


def write_pruned_onnx(model: LoadedModel, values: dict[str, np.ndarray],
                      path: str) -> LoadedModel:
    """Write the model as given, with ``values`` in place of its initializers; return
    the loaded (shape-fixed) model with the same weights, for ``--check``."""
    import onnx
    from onnx import numpy_helper

    from npas_tvm.pruning import save_model

    def replace(proto) -> None:
        for init in proto.graph.initializer:
            value = values.get(init.name.removeprefix("onnx::"))
            if value is not None:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))

    original = onnx.load(model.path)
    replace(original)
    save_model(original, path)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model.proto)
    replace(fixed)
    return dataclasses.replace(model, proto=fixed, path=path)


def compile_sparse(model: LoadedModel, spec: TargetSpec, npas: str, rate: float | None,
                   output: str, table: bool = True, tuning_db=None):
    """Prune ``model`` as ``--npas`` says and build it; returns (executable, the pruned
    model). Prints a summary line and (``table``) the per-layer table."""
    import tvm

    from npas_tvm.compiler import build, import_onnx
    from relay_passes import ApplyPruning
    from relay_passes.weights import attached_params, pruning_annotations

    annotate, source = annotate_pass(model, spec, npas, rate)
    dense = import_onnx(model).mod
    mod = tvm.transform.Sequential([annotate, ApplyPruning()])(dense)  # dense unchanged
    main = mod["main"]
    annotated = pruning_annotations(main)
    before, values = attached_params(dense["main"]), attached_params(main)
    changed = {name: value for name, value in values.items()
               if not np.array_equal(value, before[name])}
    pruned = write_pruned_onnx(model, changed, pruned_path(output))
    rows: list = []
    executable = build(mod, spec, on_layer=rows.append, tuning_db=tuning_db)
    print(f"--npas: {source}; {len(annotated)} layers pruned; pruned ONNX -> {pruned.path}")
    text = format_lowering_table(rows, spec)
    print(text if table else text.splitlines()[-1] if rows else text)
    return executable, pruned


def _kernel_speed(row, family: str) -> float:
    from relay_passes.sparse_kernels import sparse_kernel_for

    kernel = sparse_kernel_for(row.spec.scheme, family) if row.kernel else None
    return kernel.relative_speed if kernel is not None else 1.0


def format_lowering_table(rows, spec: TargetSpec) -> str:
    """Per annotated layer: scheme, rate, kernel, and the dense vs sparse estimate.

    The estimate is the MACs each kernel computes (a sparse kernel's include the
    padding of its compact format), scaled by the sparse kernel's FLOP rate relative
    to the dense kernel's (``SparseKernel.relative_speed``, measured by
    ``benchmarks/kernels.py``): a first-order figure; ``npas-tvm bench`` measures."""
    if not rows:
        return "no layer was pruned"
    width = max(len("layer"), *(len(row.name) for row in rows))
    scheme_width = max(len("scheme"), *(len(row.spec.scheme) for row in rows))
    kernel_width = max(len("kernel"), *(len(row.kernel or "dense") for row in rows))
    block_width = max(len("block"), *(len(row.spec.describe() or "-") for row in rows))
    header = (f"{'layer':<{width}}  {'kind':<9} {'scheme':<{scheme_width}} "
              f"{'block':<{block_width}} "
              f"{'rate':>6}  {'kernel':<{kernel_width}} {'dense MMAC':>10} {'sparse MMAC':>11} "
              f"{'est. speedup':>12}")
    lines = [header, "-" * len(header)]
    dense_total = sparse_total = 0.0
    for row in rows:
        rate = row.dense_macs / max(row.kept_macs, 1)
        speed = _kernel_speed(row, spec.family)
        cost = row.computed_macs / speed
        dense_total += row.dense_macs
        sparse_total += cost
        kernel = row.kernel or "dense"
        lines.append(
            f"{row.name:<{width}}  {row.kind:<9} {row.spec.scheme:<{scheme_width}} "
            f"{row.spec.describe() or '-':<{block_width}} {rate:>5.2f}x  {kernel:<{kernel_width}} "
            f"{row.dense_macs / 1e6:>10.2f} {row.computed_macs / 1e6:>11.2f} "
            f"{row.dense_macs / cost:>11.2f}x")
    lines.append("-" * len(header))
    lines.append(f"{'pruned layers':<{width}}  {len(rows)} layers, est. {dense_total / sparse_total:.2f}x "
                 f"faster than their dense kernels (MACs / the kernel's relative FLOP rate)")
    fallbacks = [row for row in rows if row.kernel is None]
    if fallbacks:
        lines.append("dense kernels for pruned layers (pruned weights, no sparse kernel):")
        lines += [f"    {row.name}: {row.reason}" for row in fallbacks]
    return "\n".join(lines)
