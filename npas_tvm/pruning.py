"""Applying a plan to an ONNX model, and reading back what a model's zeros follow.

``prune`` masks the weight initializers with the schemes' mask functions; the model
keeps its graph, so onnxruntime (or anyone) can run and check it. ``filter`` pruning
also zeroes the removed filters' biases, so a removed channel outputs exactly zero and
removing it (and the consumer's matching input channels) later changes nothing; the
report counts params and MACs as if that graph rewrite had been done.

``inspect`` reports each layer's sparsity and the most structured scheme its zeros
follow, trying schemes in this order (the ``strength`` of the registry): filter >
block_punched > block_based > pattern > unaligned_block > unstructured > dense. Filter
is first because it needs no sparse kernel at all; block schemes come before pattern
because their structure is coarser (a whole block shares one index set); within a block
scheme larger blocks win (power-of-two sides, found by doubling, up to 32). A layer
with fewer than 2% zeros is dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npas_tvm.layers import Layer
from npas_tvm.plan import Plan
from npas_tvm.schemes import (
    DEPTHWISE, GROUPED, SchemeSpec, achieved_rate, detect_spec, get_scheme, make_mask,
    rate_status)


@dataclass
class LayerReport:
    name: str
    kind: str
    spec: SchemeSpec
    achieved: float
    status: str            # "exact" (within 2%) or "nearest" (attainable for the structure)
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    note: str = ""


@dataclass
class PruneReport:
    rows: list[LayerReport] = field(default_factory=list)

    def total(self, column: str) -> int:
        """The sum of a count column: params_before/after, macs_before/after."""
        return sum(getattr(row, column) for row in self.rows)

    def table(self) -> str:
        return format_prune_table(self)


def save_model(proto, path: str) -> str:
    """Write an ONNX model; over 2 GB the weights go to an external data file beside it."""
    import os

    import onnx

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    large = proto.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF
    onnx.save(proto, path, save_as_external_data=large,
              location=os.path.basename(path) + ".data" if large else None)
    return path


def weight_arrays(proto) -> dict[str, "object"]:
    return {init.name: init for init in proto.graph.initializer}


def load_weight(initializers: dict, layer: Layer) -> np.ndarray:
    from onnx import numpy_helper

    return layer.to_scheme_layout(numpy_helper.to_array(initializers[layer.name]))


def store_array(initializers: dict, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))


def prune_proto(proto, layers: list[Layer], plan: Plan) -> PruneReport:
    """Mask ``proto``'s weight initializers in place by ``plan`` (validated against
    ``layers`` beforehand) and report per layer."""
    initializers = weight_arrays(proto)
    masks: dict[str, np.ndarray] = {}
    for layer in layers:
        spec = plan.spec_for(layer.name)
        weight = load_weight(initializers, layer)
        mask = make_mask(weight, spec)
        masks[layer.name] = mask
        if mask.all():
            continue
        store_array(initializers, layer.name,
                    layer.from_scheme_layout(np.where(mask, weight, 0).astype(weight.dtype)))
        if spec.scheme == "filter" and layer.bias:
            from onnx import numpy_helper

            bias = numpy_helper.to_array(initializers[layer.bias]).copy()
            bias[~_kept_filters(mask)] = 0
            store_array(initializers, layer.bias, bias)
    survivors = {layer.name: _kept_filters(masks[layer.name]) for layer in layers
                 if plan.spec_for(layer.name).scheme == "filter"}
    return PruneReport([_report_row(layer, plan.spec_for(layer.name), masks[layer.name],
                                    layers, survivors) for layer in layers])


def _kept_filters(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape[0], -1).any(axis=1)


def _report_row(layer: Layer, spec: SchemeSpec, mask: np.ndarray, layers: list[Layer],
                survivors: dict[str, np.ndarray]) -> LayerReport:
    """One row; ``survivors`` maps filter-pruned layers to their kept filters, whose
    consumers lose the matching input channels (a depthwise consumer whole channels;
    grouped consumers are left to the graph rewrite)."""
    kept = int(mask.sum())
    granularity = get_scheme(spec.scheme).granularity(mask.shape, spec)
    params_after, note = kept, ""
    for producer in layers:
        kept_channels = survivors.get(producer.name)
        if (kept_channels is None or kept_channels.all() or layer.kind == GROUPED
                or layer.name not in producer.consumers):
            continue
        axis = 0 if layer.kind == DEPTHWISE else 1
        params_after = int(np.compress(kept_channels, mask, axis=axis).sum())
        note = (f"in-channels {len(kept_channels)}->{int(kept_channels.sum())} "
                f"(filters of {producer.name})")
    return LayerReport(
        name=layer.name, kind=layer.kind, spec=spec, achieved=achieved_rate(mask.size, kept),
        status=rate_status(mask.size, kept, spec.rate, granularity),
        params_before=layer.params, params_after=params_after, macs_before=layer.macs,
        macs_after=round(layer.macs * params_after / layer.params), note=note)


# ----------------------------------------------------------------- inspect


@dataclass
class InspectRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    zeros: int
    total: int
    spec: SchemeSpec

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


def inspect_proto(proto, layers: list[Layer]) -> list[InspectRow]:
    initializers = weight_arrays(proto)
    rows = []
    for layer in layers:
        weight = load_weight(initializers, layer)
        rows.append(InspectRow(layer.name, layer.kind, layer.weight_shape,
                               int((weight == 0).sum()), weight.size,
                               detect_spec(weight, layer.kind)))
    return rows


# ----------------------------------------------------------------- tables


def _count(value: int) -> str:
    return f"{value:,}"


def _macs(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def _block(spec: SchemeSpec) -> str:
    return spec.describe() or "-"


def _layer_width(names: list[str]) -> int:
    return max([len("layer")] + [len(name) for name in names])


def format_prune_table(report: PruneReport) -> str:
    width = _layer_width([row.name for row in report.rows])
    header = (f"{'layer':<{width}}  {'kind':<9} {'scheme':<15} {'block':<11} {'asked':>6} "
              f"{'achieved':>9}  {'params before':>13} {'after':>11}  {'MACs before':>11} "
              f"{'after':>9}")
    lines = [header, "-" * len(header)]
    nearest = filtered = False
    for row in report.rows:
        mark = "*" if row.status == "nearest" else " "
        nearest |= row.status == "nearest"
        shrink = "+" if row.note else " "
        filtered |= bool(row.note)
        lines.append(
            f"{row.name:<{width}}  {row.kind:<9} {row.spec.scheme:<15} {_block(row.spec):<11} "
            f"{row.spec.rate:>6.2f} {row.achieved:>8.2f}{mark}  "
            f"{_count(row.params_before):>13} {_count(row.params_after):>10}{shrink}  "
            f"{_macs(row.macs_before):>11} {_macs(row.macs_after):>9}")
    lines.append("-" * len(header))
    params = report.total("params_before"), report.total("params_after")
    macs = report.total("macs_before"), report.total("macs_after")
    lines.append(f"{'total':<{width}}  {len(report.rows)} layers{'':<44}"
                 f"{_count(params[0]):>13} {_count(params[1]):>10}   "
                 f"{_macs(macs[0]):>11} {_macs(macs[1]):>9}")
    total_rate, mac_rate = achieved_rate(*params), achieved_rate(*macs)
    lines.append(f"overall: params {total_rate:.2f}x fewer, MACs {mac_rate:.2f}x fewer "
                 "(prunable Conv/Gemm/MatMul weights; MACs of sparse layers counted as "
                 "their kept weights)")
    lines.append("achieved rates are within 2% of the asked ones"
                 + (", except * : the nearest rate the structure attains" if nearest else ""))
    if filtered:
        lines.append("+ : also loses the input channels of a filter-pruned producer (counted "
                     "as if removed; the ONNX keeps them as zeros):")
        lines += [f"    {row.name}: {row.note}" for row in report.rows if row.note]
    return "\n".join(lines)


def format_inspect_table(rows: list[InspectRow]) -> str:
    width = _layer_width([row.name for row in rows])
    header = (f"{'layer':<{width}}  {'kind':<9} {'shape':<16} {'sparsity':>8} {'rate':>7}  "
              f"{'strongest scheme':<16} {'block':<11} {'rate':>6}")
    lines = [header, "-" * len(header)]
    for row in rows:
        nonzeros = row.total - row.zeros
        rate = f"{achieved_rate(row.total, nonzeros):.2f}" if nonzeros else "inf"
        lines.append(f"{row.name:<{width}}  {row.kind:<9} {'x'.join(map(str, row.shape)):<16} "
                     f"{row.sparsity:>7.1%} {rate:>7}  {row.spec.scheme:<16} "
                     f"{_block(row.spec):<11} {row.spec.rate:>6.2f}")
    zeros, total = sum(r.zeros for r in rows), sum(r.total for r in rows)
    lines.append("-" * len(header))
    lines.append(f"{len(rows)} prunable layers, {total:,} weights, {zeros / max(total, 1):.1%} "
                 "zeros")
    return "\n".join(lines)
