"""The scheme registry: the one place that says what a pruning scheme is.

A :class:`Scheme` is data plus functions: its spec type (the plan entry), its mask
function, its structural *cover* (the checker's core), its granularity, the layer kinds
it fits and, for ``inspect``, the candidate specs to try on a mask. Plan validation,
the ``prune`` and ``inspect`` commands, and the later passes, kernel packers and search
all read this registry, so a scheme is added in one file (see ``npas_tvm/schemes/__init__``).

Later layers attach their own per-scheme pieces with :func:`register_hook` (a packer,
kernel generators per target family, a cost hint) without editing the scheme's file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from npas_tvm.schemes._core import (
    CONV, CONV1X1, DEPTHWISE, FC, GROUPED, RATE_TOLERANCE, Granularity, SchemeSpec,
    as_bool_mask, covers_rate, explains)

MaskFn = Callable[[np.ndarray, SchemeSpec], np.ndarray]
CoverFn = Callable[[np.ndarray, SchemeSpec], "int | None"]
GranularityFn = Callable[[tuple[int, ...], SchemeSpec], Granularity]
ShapeCheckFn = Callable[[tuple[int, ...], SchemeSpec], "str | None"]
CandidatesFn = Callable[[np.ndarray], Iterable[SchemeSpec]]

KIND_TEXT = {CONV: "KxK conv", CONV1X1: "1x1 conv", DEPTHWISE: "depthwise conv",
             GROUPED: "grouped conv", FC: "fully connected (Gemm/MatMul) layer"}


@dataclass(frozen=True)
class Scheme:
    """One pruning scheme.

    Fields:
      name: the plan's ``"scheme"`` value.
      spec_type: the frozen dataclass of its plan entry (``rate`` plus its own fields).
      mask: ``(weight, spec) -> bool mask`` of the weight's shape, magnitude-based.
      cover: ``(bool mask, spec) -> kept count`` of the smallest mask of this scheme that
        holds every ``True`` of the given mask, or None if no mask of the scheme does. The
        checker is "cover exists and its rate honours the spec".
      granularity: ``(shape, spec) -> Granularity``, how finely the rate can be set.
      kinds: the layer kinds (``_core.LAYER_KINDS``) the scheme fits.
      strength: the order ``inspect`` tries schemes in, most structured (fastest) first.
      shape_check: extra fit rules beyond the kind (a block larger than the weight).
      candidates: ``bool mask -> specs`` to try, strongest first, when ``inspect`` asks
        which spec a mask follows (their rates are ignored).
      hooks: what later layers attach (packers, kernel generators, cost hints).
    """

    name: str
    spec_type: type[SchemeSpec]
    mask: MaskFn
    cover: CoverFn
    granularity: GranularityFn
    kinds: tuple[str, ...]
    strength: int
    paper: str
    summary: str
    shape_check: ShapeCheckFn | None = None
    candidates: CandidatesFn | None = None
    hooks: dict[str, Any] = field(default_factory=dict)

    def fit_error(self, kind: str, shape: tuple[int, ...], spec: SchemeSpec) -> str | None:
        """Why ``spec`` cannot prune a layer of this kind and weight shape, or None."""
        if kind not in self.kinds:
            fits = ", ".join(KIND_TEXT[k] for k in self.kinds)
            return f"scheme {self.name!r} does not fit a {KIND_TEXT[kind]} (it fits: {fits})"
        return self.shape_check(tuple(shape), spec) if self.shape_check else None

    def hook(self, key: str) -> Any:
        """A hook attached with :func:`register_hook`; KeyError names what is missing."""
        try:
            return self.hooks[key]
        except KeyError:
            raise KeyError(f"scheme {self.name!r} has no {key!r} hook registered") from None


SCHEMES: dict[str, Scheme] = {}
"""name -> Scheme, in registration order."""


def register_scheme(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    if scheme.spec_type.scheme != scheme.name:
        raise ValueError(f"{scheme.spec_type.__name__}.scheme must be {scheme.name!r}")
    SCHEMES[scheme.name] = scheme
    return scheme


def register_hook(name: str, key: str, value: Any) -> None:
    """Attach ``value`` under ``key`` to scheme ``name`` (e.g. ``"pack"``, ``"kernel:arm"``)."""
    get_scheme(name).hooks[key] = value


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        from npas_tvm.schemes._core import SpecError

        raise SpecError("scheme", f"{name!r} is unknown; choose one of "
                                  f"{', '.join(SCHEMES)}") from None


def make_mask(weight: np.ndarray, spec: SchemeSpec) -> np.ndarray:
    """The boolean keep-mask ``spec`` gives ``weight`` (same shape)."""
    mask = get_scheme(spec.scheme).mask(np.asarray(weight), spec)
    assert mask.shape == np.shape(weight) and mask.dtype == bool
    return mask


def satisfies(weight_or_mask: np.ndarray, spec: SchemeSpec) -> bool:
    """Whether the zeros of a weight (or a boolean mask) follow ``spec``'s structure at
    (at least, within 2%, or the nearest attainable) its rate."""
    mask = as_bool_mask(weight_or_mask)
    scheme = get_scheme(spec.scheme)
    kept = scheme.cover(mask, spec)
    if kept is None:
        return False
    return covers_rate(mask.size, kept, spec.rate, scheme.granularity(mask.shape, spec))


def achieved_rate(total: int, kept: int) -> float:
    return total / kept if kept else float("inf")


def detect_spec(weight_or_mask: np.ndarray, kind: str) -> SchemeSpec:
    """The most structured spec whose structure explains the zeros of a weight.

    Schemes are tried from the highest ``strength`` down, each with its candidate specs
    (larger blocks first); the first whose cover keeps at most 2% more weights than the
    nonzeros wins, with the rate of that cover. A layer with fewer than 2% zeros is dense.
    """
    mask = as_bool_mask(weight_or_mask)
    total, nonzeros = mask.size, int(mask.sum())
    dense = SCHEMES["dense"].spec_type()
    if nonzeros * (1.0 + RATE_TOLERANCE) >= total:
        return dense
    for scheme in sorted(SCHEMES.values(), key=lambda s: -s.strength):
        if kind not in scheme.kinds or scheme.candidates is None:
            continue
        for candidate in scheme.candidates(mask):
            if scheme.shape_check and scheme.shape_check(mask.shape, candidate):
                continue
            kept = scheme.cover(mask, candidate)
            if kept is not None and explains(nonzeros, kept):
                rate = max(1.0, achieved_rate(total, max(kept, 1)))
                return type(candidate)(**{**vars(candidate), "rate": rate})
    return dense
