"""``filter``: remove whole output channels (filters) by L2 norm.

Filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR'17; one of the
per-layer choices of NPAS, Li et al., CVPR'21): the layer stays dense and smaller, and the
consumer's matching input channels go too once the graph is rewritten. In a masked model
a removed filter's weights (and its bias, see ``npas_tvm.pruning``) are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import (
    LAYER_KINDS, Granularity, SchemeSpec, kept_target, select_prefix)
from npas_tvm.schemes.registry import Scheme, register_scheme


@dataclass(frozen=True)
class FilterSpec(SchemeSpec):
    scheme = "filter"


def filter_scores(weight: np.ndarray) -> np.ndarray:
    """The L2 norm of each output channel."""
    return np.sqrt(np.square(weight.reshape(weight.shape[0], -1), dtype=np.float64).sum(1))


def filter_mask(weight: np.ndarray, spec: FilterSpec) -> np.ndarray:
    filter_size = weight.size // weight.shape[0]
    keep = select_prefix(filter_scores(weight), filter_size, kept_target(weight.size, spec.rate))
    return np.broadcast_to(keep.reshape((-1,) + (1,) * (weight.ndim - 1)), weight.shape).copy()


def filter_cover(mask: np.ndarray, spec: FilterSpec) -> int:
    rows = mask.reshape(mask.shape[0], -1)
    return int(rows.any(axis=1).sum()) * rows.shape[1]


def filter_granularity(shape: tuple[int, ...], spec: FilterSpec) -> Granularity:
    step = int(np.prod(shape[1:]))
    return Granularity(step=step, min_kept=step, max_kept=step * shape[0])


def filter_candidates(mask: np.ndarray) -> Iterator[FilterSpec]:
    yield FilterSpec()


FILTER = register_scheme(Scheme(
    name="filter", spec_type=FilterSpec, mask=filter_mask, cover=filter_cover,
    granularity=filter_granularity, kinds=LAYER_KINDS, strength=60,
    paper="Li et al., ICLR'17; Li et al., NPAS, CVPR'21",
    summary="whole output channels", candidates=filter_candidates))
