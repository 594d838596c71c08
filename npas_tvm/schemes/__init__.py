"""Pruning schemes: the shared vocabulary of the plan, the passes, the kernels and the search.

Pure numpy (no TVM, no torch): a torch training loop calls ``make_mask(w.detach().numpy(),
spec)`` and multiplies. Weights are conv ``[F, C, kh, kw]`` (grouped conv: C = in / groups)
or GEMM ``[M, K] = [out, in]``; a 1x1 conv is treated as the GEMM ``[F, C]``. Rate r =
total / kept weights of the layer (NPAS, Li et al., CVPR'21).

The API::

    spec = spec_from_json({"scheme": "block_punched", "rate": 5, "block": [8, 4]})
    mask = make_mask(weight, spec)          # bool, weight's shape
    satisfies(weight * mask, spec)          # True: the zeros follow the structure
    detect_spec(weight, "conv")             # the most structured spec the zeros follow
    get_scheme("pattern").fit_error(kind, weight.shape, spec)   # None if it fits
    register_hook("block_punched", "pack", pack_fn)             # later layers' pieces
    get_scheme("block_punched").hook("pack")

Adding a scheme is one file in this package, imported at the end of this module:

1. a frozen ``SchemeSpec`` subclass with ``scheme = "name"`` and its fields (validated in
   ``__post_init__``, raising ``SpecError(field, reason)``);
2. ``mask(weight, spec) -> bool array``, magnitude-based, built on the helpers of
   ``_core`` (``kept_target``, ``select_prefix``/``top_k_mask``, ``blocked``) so that rates,
   ties and ragged blocks behave as everywhere else;
3. ``cover(mask, spec) -> int | None``: the kept count of the smallest mask of the scheme
   holding the given nonzeros (the checker), and ``granularity(shape, spec)``;
4. ``register_scheme(Scheme(name=..., kinds=..., strength=..., candidates=...))``.

Plan files, ``prune``, ``inspect`` and the tests then know it; the property tests in
``tests/test_schemes.py`` run over every registered scheme.
"""

from __future__ import annotations

from typing import Any

from npas_tvm.schemes._core import (
    CONV, CONV1X1, DEPTHWISE, FC, GEMM_KINDS, GROUPED, LAYER_KINDS, RATE_TOLERANCE,
    Granularity, SchemeSpec, SpecError, kept_target, rate_status)
from npas_tvm.schemes.registry import (
    KIND_TEXT, SCHEMES, Scheme, achieved_rate, detect_spec, get_scheme, make_mask,
    register_hook, register_scheme, satisfies)

# Registration order is the order users see (most familiar first).
from npas_tvm.schemes.dense import DenseSpec  # noqa: E402
from npas_tvm.schemes.unstructured import UnstructuredSpec  # noqa: E402
from npas_tvm.schemes.filter import FilterSpec  # noqa: E402
from npas_tvm.schemes.pattern import PatternSpec  # noqa: E402
from npas_tvm.schemes.block_punched import BlockPunchedSpec  # noqa: E402
from npas_tvm.schemes.block_based import BlockBasedSpec  # noqa: E402
from npas_tvm.schemes.unaligned_block import UnalignedBlockSpec  # noqa: E402


def spec_from_json(entry: Any) -> SchemeSpec:
    """A spec from a plan entry ``{"scheme": ..., "rate": ..., ...}``.

    Raises :class:`SpecError` naming the field: a missing scheme or rate, an unknown
    scheme or key, a bad value. ``dense`` needs no rate.
    """
    if not isinstance(entry, dict):
        raise SpecError("scheme", f"expected an object like {{\"scheme\": \"dense\"}}, "
                                  f"got {type(entry).__name__}")
    if "scheme" not in entry:
        raise SpecError("scheme", "missing")
    name = entry["scheme"]
    if not isinstance(name, str):
        raise SpecError("scheme", f"{name!r} is not a string")
    spec_type = get_scheme(name).spec_type
    fields = spec_type.__dataclass_fields__
    for key in entry:
        if key != "scheme" and key not in fields:
            raise SpecError(key, f"unknown for scheme {name!r} (its fields: "
                                 f"{', '.join(fields)})")
    if "rate" not in entry and name != "dense":
        raise SpecError("rate", f"missing (scheme {name!r} needs a rate >= 1)")
    return spec_type(**{key: value for key, value in entry.items() if key != "scheme"})


__all__ = [
    "CONV", "CONV1X1", "DEPTHWISE", "FC", "GEMM_KINDS", "GROUPED", "LAYER_KINDS", "KIND_TEXT",
    "RATE_TOLERANCE", "SCHEMES", "Granularity", "Scheme", "SchemeSpec", "SpecError",
    "BlockBasedSpec", "BlockPunchedSpec", "DenseSpec", "FilterSpec", "PatternSpec",
    "UnalignedBlockSpec", "UnstructuredSpec", "achieved_rate", "detect_spec", "get_scheme",
    "kept_target", "make_mask", "rate_status", "register_hook", "register_scheme",
    "satisfies", "spec_from_json"]
