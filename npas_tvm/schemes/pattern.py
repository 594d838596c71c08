"""``pattern``: 4-entry kernel patterns plus connectivity pruning, for 3x3 convolutions.

PatDNN (Niu et al., "PatDNN: Achieving Real-Time DNN Execution on Mobile Devices with
Pattern-based Weight Pruning", ASPLOS'20) and the pattern scheme of NPAS (Li et al.,
CVPR'21): every kept 3x3 kernel keeps exactly 4 entries, the centre always among them
(C(8, 3) = 56 candidate shapes). A layer uses a small set of them, the most frequent
top-4-magnitude shapes of its kernels (8 by default); each kernel takes the member that
keeps the largest L2 norm. Patterns alone give 9/4 = 2.25x; connectivity pruning removes
whole kernels (by the norm their pattern keeps) for higher rates. Rates below 2.25 give
2.25, the nearest attainable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import (
    CONV, DEPTHWISE, GROUPED, Granularity, SchemeSpec, check_positive_int, kept_target,
    rank_descending, select_prefix)
from npas_tvm.schemes.registry import Scheme, register_scheme

KERNEL_ENTRIES = 9
CENTRE = 4
PATTERN_SIZE = 4
NON_CENTRE = np.array([i for i in range(KERNEL_ENTRIES) if i != CENTRE])
CANDIDATES = np.zeros((56, KERNEL_ENTRIES), dtype=bool)
"""The 56 candidate patterns, row i = pattern id i, each the centre plus 3 others."""
for _index, _others in enumerate(itertools.combinations(NON_CENTRE.tolist(), 3)):
    CANDIDATES[_index, [CENTRE, *_others]] = True
_BIT_VALUES = 1 << np.arange(KERNEL_ENTRIES)
CANDIDATE_BITS = CANDIDATES.astype(np.int64) @ _BIT_VALUES
_ID_OF_BITS = np.full(1 << KERNEL_ENTRIES, -1, dtype=np.int64)
_ID_OF_BITS[CANDIDATE_BITS] = np.arange(len(CANDIDATES))


@dataclass(frozen=True)
class PatternSpec(SchemeSpec):
    patterns: int = 8

    scheme = "pattern"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "patterns",
                           check_positive_int("patterns", self.patterns, len(CANDIDATES)))


def kernels(weight: np.ndarray) -> np.ndarray:
    """A [F, C, 3, 3] weight (or mask) as one row of 9 per kernel."""
    return weight.reshape(-1, KERNEL_ENTRIES)


def preferred_patterns(energy: np.ndarray) -> np.ndarray:
    """Each kernel's own best pattern id: the centre plus its 3 largest other entries."""
    order = np.argsort(-energy[:, NON_CENTRE], axis=1, kind="stable")[:, :3]
    bits = (1 << CENTRE) + (1 << NON_CENTRE[order]).sum(axis=1)
    return _ID_OF_BITS[bits]


def pattern_set(weight: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` most frequent preferred patterns of a layer (ids; ties by id)."""
    energy = np.square(kernels(weight), dtype=np.float64)
    frequency = np.bincount(preferred_patterns(energy), minlength=len(CANDIDATES))
    return rank_descending(frequency)[:count]


def pattern_mask(weight: np.ndarray, spec: PatternSpec) -> np.ndarray:
    energy = np.square(kernels(weight), dtype=np.float64)
    chosen = CANDIDATES[pattern_set(weight, spec.patterns)]        # [p, 9]
    kept_energy = energy @ chosen.T.astype(np.float64)              # [kernels, p]
    best = np.argmax(kept_energy, axis=1)                           # first on ties
    kernel_norm = np.sqrt(kept_energy[np.arange(len(best)), best])
    connected = select_prefix(kernel_norm, PATTERN_SIZE, kept_target(weight.size, spec.rate))
    return (chosen[best] & connected[:, None]).reshape(weight.shape)


def pattern_usage(mask: np.ndarray) -> tuple[int, int] | None:
    """(kept kernels, fewest distinct patterns that hold them), or None if some kernel
    has more than 3 nonzeros besides its centre. Kernels with fewer nonzeros fit several
    patterns; they reuse a pattern already needed where they can, else a greedy pick."""
    rows = kernels(mask)
    kept = rows.any(axis=1)
    if (rows[:, NON_CENTRE].sum(axis=1) > 3).any():
        return None
    bits = np.unique(rows[kept].astype(np.int64) @ _BIT_VALUES | (1 << CENTRE))
    full = {int(_ID_OF_BITS[b]) for b in bits if _ID_OF_BITS[b] >= 0}
    partial = [int(b) for b in bits if _ID_OF_BITS[b] < 0]
    used = set(full)
    uncovered = [b for b in partial
                 if not any(b & CANDIDATE_BITS[i] == b for i in used)]
    while uncovered:
        covers = [(sum(b & c == b for b in uncovered), -i) for i, c in enumerate(CANDIDATE_BITS)]
        best = -max(covers)[1]
        used.add(best)
        uncovered = [b for b in uncovered if b & CANDIDATE_BITS[best] != b]
    return int(kept.sum()), len(used)


def pattern_cover(mask: np.ndarray, spec: PatternSpec) -> int | None:
    if mask.ndim != 4 or mask.shape[2:] != (3, 3):
        return None
    usage = pattern_usage(mask)
    if usage is None or usage[1] > spec.patterns:
        return None
    return usage[0] * PATTERN_SIZE


def pattern_granularity(shape: tuple[int, ...], spec: PatternSpec) -> Granularity:
    kernel_count = int(np.prod(shape[:2]))
    return Granularity(step=PATTERN_SIZE, min_kept=PATTERN_SIZE,
                       max_kept=PATTERN_SIZE * kernel_count)


def pattern_shape_check(shape: tuple[int, ...], spec: PatternSpec) -> str | None:
    if len(shape) != 4 or shape[2:] != (3, 3):
        kernel = "x".join(map(str, shape[2:])) or "no"
        return f"scheme 'pattern' needs 3x3 kernels; this layer has {kernel} kernels"
    return None


def pattern_candidates(mask: np.ndarray) -> Iterator[PatternSpec]:
    usage = pattern_usage(mask) if mask.shape[2:] == (3, 3) else None
    if usage is not None:
        yield PatternSpec(patterns=max(1, usage[1]))


PATTERN = register_scheme(Scheme(
    name="pattern", spec_type=PatternSpec, mask=pattern_mask, cover=pattern_cover,
    granularity=pattern_granularity, kinds=(CONV, DEPTHWISE, GROUPED), strength=30,
    paper="Niu et al., PatDNN, ASPLOS'20; Li et al., NPAS, CVPR'21",
    summary="3x3 kernels keep 4 entries (centre + 3) from a small pattern set, "
            "plus connectivity pruning of whole kernels",
    shape_check=pattern_shape_check, candidates=pattern_candidates))
