"""``dense``: keep every weight.

The "no pruning" choice of a layer in the NPAS search space (Li et al., "NPAS: A
Compiler-aware Framework of Unified Network Pruning and Architecture Search for Beyond
Real-Time Mobile Acceleration", CVPR'21): rate 1, the dense schedules run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npas_tvm.schemes._core import LAYER_KINDS, Granularity, SchemeSpec, SpecError
from npas_tvm.schemes.registry import Scheme, register_scheme


@dataclass(frozen=True)
class DenseSpec(SchemeSpec):
    scheme = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate != 1.0:
            raise SpecError("rate", f"{self.rate:g} given, but dense keeps every weight "
                                    "(rate 1); choose a pruning scheme for a higher rate")


def dense_mask(weight: np.ndarray, spec: DenseSpec) -> np.ndarray:
    return np.ones(weight.shape, dtype=bool)


def dense_cover(mask: np.ndarray, spec: DenseSpec) -> int:
    return mask.size


def dense_granularity(shape: tuple[int, ...], spec: DenseSpec) -> Granularity:
    total = int(np.prod(shape))
    return Granularity(step=1, min_kept=total, max_kept=total)


DENSE = register_scheme(Scheme(
    name="dense", spec_type=DenseSpec, mask=dense_mask, cover=dense_cover,
    granularity=dense_granularity, kinds=LAYER_KINDS, strength=0,
    paper="Li et al., NPAS, CVPR'21", summary="no pruning"))
