"""``unstructured``: magnitude pruning of single weights.

The classic baseline (Han et al., "Learning both Weights and Connections for Efficient
Neural Networks", NeurIPS'15) that NPAS (Li et al., CVPR'21) compares its structured
schemes against: the most accurate at a given rate, the hardest to run fast (a CSR
kernel), so every structured scheme must beat it in speed at equal rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import LAYER_KINDS, Granularity, SchemeSpec, kept_target, top_k_mask
from npas_tvm.schemes.registry import Scheme, register_scheme


@dataclass(frozen=True)
class UnstructuredSpec(SchemeSpec):
    scheme = "unstructured"


def unstructured_mask(weight: np.ndarray, spec: UnstructuredSpec) -> np.ndarray:
    """Keep the round(total / rate) largest |w| (at least one)."""
    keep = max(1, round(kept_target(weight.size, spec.rate)))
    return top_k_mask(np.abs(weight), keep)


def unstructured_cover(mask: np.ndarray, spec: UnstructuredSpec) -> int:
    return int(mask.sum())


def unstructured_granularity(shape: tuple[int, ...], spec: UnstructuredSpec) -> Granularity:
    return Granularity(step=1, min_kept=1, max_kept=int(np.prod(shape)))


def unstructured_candidates(mask: np.ndarray) -> Iterator[UnstructuredSpec]:
    yield UnstructuredSpec()


UNSTRUCTURED = register_scheme(Scheme(
    name="unstructured", spec_type=UnstructuredSpec, mask=unstructured_mask,
    cover=unstructured_cover, granularity=unstructured_granularity, kinds=LAYER_KINDS,
    strength=10, paper="Han et al., NeurIPS'15; baseline in Li et al., NPAS, CVPR'21",
    summary="single weights by magnitude", candidates=unstructured_candidates))
