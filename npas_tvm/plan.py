"""The pruning plan: which scheme, rate and block each layer gets.

A plan is JSON, versioned and stable (the search writes it, ``compile --npas`` and
``prune`` read it)::

    {"format": "npas-plan", "version": 1,
     "layers": {"features.3.weight": {"scheme": "block_punched", "rate": 5.0, "block": [8, 4]},
                "fc.weight": {"scheme": "block_based", "rate": 5.0, "block": [16, 4]}},
     "default": {"scheme": "dense"},
     "meta": {"source": "rule", "rate": 3.0}}

Layers are keyed by their weight initializer's name; an unlisted layer takes
``default``. ``meta`` is free-form provenance, kept but not interpreted. Every error is
one line naming the file, the layer and the field.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from npas_tvm.errors import PlanError
from npas_tvm.schemes import DenseSpec, SchemeSpec, SpecError, get_scheme, spec_from_json

PLAN_FORMAT = "npas-plan"
PLAN_VERSION = 1
TOP_LEVEL_KEYS = ("format", "version", "layers", "default", "meta")


@dataclass
class Plan:
    layers: dict[str, SchemeSpec] = field(default_factory=dict)
    default: SchemeSpec = field(default_factory=DenseSpec)
    meta: dict[str, Any] = field(default_factory=dict)

    def spec_for(self, name: str) -> SchemeSpec:
        return self.layers.get(name, self.default)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PLAN_FORMAT, "version": PLAN_VERSION,
            "layers": {name: spec.to_json() for name, spec in self.layers.items()},
            "default": self.default.to_json()}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> "Plan":
        """Parse a plan's JSON; :class:`PlanError` names ``source``, layer and field."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a JSON object with \"format\": "
                            f"\"{PLAN_FORMAT}\", got {type(data).__name__}")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise PlanError(f"{source}: unknown top-level key {key!r} (expected "
                                f"{', '.join(TOP_LEVEL_KEYS)})")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: field 'format' is {data.get('format')!r}, "
                            f"expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: field 'version' is {data.get('version')!r}; this "
                            f"npas-tvm reads version {PLAN_VERSION}")
        layers = data.get("layers", {})
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: field 'layers' must be an object keyed by weight "
                            "initializer name")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"{source}: field 'meta' must be an object")
        return cls(layers={name: _parse_spec(entry, source, f"layer {name!r}")
                           for name, entry in layers.items()},
                   default=_parse_spec(data.get("default", {"scheme": "dense"}), source,
                                       "default"),
                   meta=meta)


def _parse_spec(entry: Any, source: str, where: str) -> SchemeSpec:
    try:
        return spec_from_json(entry)
    except SpecError as err:
        raise PlanError(f"{source}: {where}: {err}") from None
    except TypeError as err:  # a field given a value of an unusable type
        raise PlanError(f"{source}: {where}: {err}") from None


def load_plan(path: str) -> Plan:
    if not os.path.exists(path):
        raise PlanError(f"{path}: no such plan file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                        f"{err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"{path}: cannot read the plan ({err})") from None
    return Plan.from_json(data, source=path)


def save_plan(plan: Plan, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(plan.to_json(), handle, indent=2)
        handle.write("\n")
    return path


def validate_plan(plan: Plan, layers: Iterable, source: str = "plan") -> None:
    """Check ``plan`` against a model's prunable layers (``npas_tvm.layers.Layer``):
    every listed name is a layer, every scheme fits its layer, and the default fits
    every layer it applies to. Raises :class:`PlanError` on the first problem."""
    by_name = {layer.name: layer for layer in layers}
    for name, spec in plan.layers.items():
        if name not in by_name:
            close = difflib.get_close_matches(name, by_name, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PlanError(f"{source}: layer {name!r}: not a prunable layer of the model "
                            f"(no Conv/Gemm/MatMul weight initializer by that name){hint}")
        _check_fits(spec, by_name[name], source, f"layer {name!r}")
    for name, layer in by_name.items():
        if name not in plan.layers:
            _check_fits(plan.default, layer, source,
                        f"default (applies to the unlisted layer {name!r})")


def _check_fits(spec: SchemeSpec, layer, source: str, where: str) -> None:
    problem = get_scheme(spec.scheme).fit_error(layer.kind, layer.weight_shape, spec)
    if problem:
        field_name = "block" if problem.startswith("block") else "scheme"
        raise PlanError(f"{source}: {where}: field {field_name!r}: {problem}")
