"""What every pruning scheme shares: the spec base class, rates, ranking and block views.

Pure numpy. One helper per idea, so that the schemes differ only in what a *unit* of
their structure is (a weight, a filter, a kernel position of a block, a column of a
block, a window of rows) and how it is scored:

* :func:`kept_target` turns a rate into the number of weights to keep
  (rate r = total weights / kept weights, the definition of NPAS, Li et al., CVPR'21);
* :func:`rank_descending` is the one "top-k by score" ordering, ties broken by position
  so that every mask is deterministic;
* :func:`select_prefix` keeps the best-scored units until their weights reach a target,
  which makes every mask monotone (no removed unit outscores a kept one);
* :func:`rate_status` says whether an achieved rate is within 2% of the asked one or
  the nearest value the structure can attain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from npas_tvm.errors import PlanError

RATE_TOLERANCE = 0.02
"""An achieved rate within 2% of the asked one counts as hitting it."""

# Layer kinds, as the ONNX layer extractor (npas_tvm.layers) names them.
CONV = "conv"            # KxK convolution (K > 1), groups == 1
CONV1X1 = "conv1x1"      # 1x1 convolution, groups == 1: a GEMM [F, C]
DEPTHWISE = "depthwise"  # groups == in_channels == out_channels / multiplier
GROUPED = "grouped"      # any other grouped convolution
FC = "fc"                # Gemm / MatMul with a constant weight, as [out, in]
LAYER_KINDS = (CONV, CONV1X1, DEPTHWISE, GROUPED, FC)
GEMM_KINDS = (CONV1X1, FC)


class SpecError(PlanError):
    """A scheme spec field has a bad value; ``field`` names it so a plan can say where."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class SchemeSpec:
    """The data of one layer's pruning: which scheme, how hard, with what block.

    Subclasses add their fields (``block``, ``patterns``...) and set ``scheme``. A spec
    is plain data: it serialises to the plan's JSON entry and back, and validates its own
    fields when built, raising :class:`SpecError` naming the field.
    """

    scheme: ClassVar[str] = ""
    rate: float = 1.0

    def __post_init__(self) -> None:
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)):
            raise SpecError("rate", f"{rate!r} is not a number")
        if not np.isfinite(rate) or rate < 1:
            raise SpecError("rate", f"{rate!r} is below 1 (rate = total / kept weights, "
                                    "so 1 keeps everything and 5 keeps a fifth)")
        object.__setattr__(self, "rate", float(rate))

    def to_json(self) -> dict[str, Any]:
        """The plan entry: ``{"scheme": ..., "rate": ..., <fields>}``, tuples as lists."""
        entry: dict[str, Any] = {"scheme": self.scheme}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            entry[item.name] = list(value) if isinstance(value, tuple) else value
        return entry

    def describe(self) -> str:
        """Short text for tables: the scheme's own fields besides the rate."""
        parts = []
        for item in dataclasses.fields(self):
            if item.name == "rate":
                continue
            value = getattr(self, item.name)
            if item.name == "block":
                parts.append("x".join(map(str, value)))
            elif isinstance(value, bool):
                parts.append(item.name if value else "")
            else:
                parts.append(f"{item.name}={value}")
        return " ".join(p for p in parts if p)


def check_positive_int(field: str, value: Any, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecError(field, f"{value!r} is not a positive integer")
    if upper is not None and value > upper:
        raise SpecError(field, f"{value} is above {upper}")
    return int(value)


def check_block(value: Any, field: str = "block") -> tuple[int, int]:
    """A block is two positive integers ``[rows, cols]``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(field, f"{value!r} is not a pair [rows, cols] of positive integers")
    return (check_positive_int(field, value[0]), check_positive_int(field, value[1]))


def block_too_large(block: tuple[int, int], extent: tuple[int, int],
                    names: tuple[str, str]) -> str | None:
    """Why ``block`` does not fit a weight of ``extent``, or None. Ragged edges are fine."""
    for size, limit, name in zip(block, extent, names):
        if size > limit:
            return (f"block {block[0]}x{block[1]} is larger than the weight: {size} > "
                    f"{limit} {name}")
    return None


# ----------------------------------------------------------------- rates


@dataclass(frozen=True)
class Granularity:
    """How finely a scheme can set a layer's kept count.

    ``step``: the most weights one unit of the structure holds (a filter, a block column);
    ``min_kept``/``max_kept``: the fewest and most weights any mask of the scheme keeps.
    """

    step: int
    min_kept: int
    max_kept: int


def kept_target(total: int, rate: float) -> float:
    """The number of weights a rate asks to keep (a real number; structures round it)."""
    return total / rate


def rate_status(total: int, kept: int, asked: float, granularity: Granularity) -> str:
    """``"exact"`` (within 2%), ``"nearest"`` (the closest the structure attains) or
    ``"missed"``. A structure that cannot reach the asked rate (a filter of 576 weights
    in a layer of 1152 cannot give 3x) reports ``nearest``, so users see which."""
    if kept > 0 and abs(total / kept / asked - 1.0) <= RATE_TOLERANCE:
        return "exact"
    if 0 < kept <= granularity.step and kept_target(total, asked) < kept:
        return "nearest"  # one unit, the best-scored (with ragged blocks, maybe the largest)
    target = min(max(kept_target(total, asked), granularity.min_kept), granularity.max_kept)
    return "nearest" if abs(kept - target) <= granularity.step / 2 + 1e-9 else "missed"


def covers_rate(total: int, kept: int, asked: float, granularity: Granularity) -> bool:
    """Whether keeping ``kept`` weights honours rate ``asked``: at least as sparse (with
    2% slack), or as close as the structure allows. Used by every checker."""
    target = kept_target(total, asked)
    # A mask keeps at least one unit, and magnitude order makes it the best-scored one,
    # which with ragged edge blocks may be the largest: one unit's worth always passes.
    if kept <= target * (1.0 + RATE_TOLERANCE) or kept <= max(granularity.min_kept,
                                                               granularity.step):
        return True
    return rate_status(total, kept, asked, granularity) != "missed"


# ----------------------------------------------------------------- selection


def rank_descending(scores: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Indices of ``scores`` (flattened, or along ``axis``) from best to worst; ties go to
    the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    if axis is None:
        scores = scores.ravel()
        axis = 0
    return np.argsort(-scores, axis=axis, kind="stable")


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (shape of ``scores``) of the ``k`` best entries, ties by position."""
    keep = np.zeros(scores.size, dtype=bool)
    keep[rank_descending(scores)[:max(0, int(k))]] = True
    return keep.reshape(scores.shape)


def select_prefix(scores: np.ndarray, sizes: np.ndarray, target: float,
                  min_units: int = 1) -> np.ndarray:
    """Keep the best-scored units until their total size is as close to ``target`` as
    a prefix of the ranking can get (at least ``min_units``). Units of size 0 (padding)
    are never kept. Returns a boolean mask shaped like ``scores``.

    Taking a prefix of one ranking is what makes masks monotone: a removed unit never
    outscores a kept one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.broadcast_to(np.asarray(sizes), scores.shape).ravel()
    order = rank_descending(np.where(sizes > 0, scores.ravel(), -np.inf))
    order = order[sizes[order] > 0]
    cumulative = np.concatenate([[0], np.cumsum(sizes[order])])
    count = int(np.argmin(np.abs(cumulative - target)))  # first best: fewer units on ties
    count = min(max(count, min_units), len(order))
    keep = np.zeros(scores.size, dtype=bool)
    keep[order[:count]] = True
    return keep.reshape(scores.shape)


def balanced_select(scores: np.ndarray, valid: np.ndarray, unit_size: np.ndarray,
                    fraction: float, target: float) -> np.ndarray:
    """Per block (row of ``scores``), keep the same share of its valid units, best first.

    Every block keeps ``floor(valid_units * fraction)`` units; one more unit goes to the
    blocks whose next-best unit scores highest, until the kept weights (``unit_size`` per
    unit of a block) come as close to ``target`` as they can. Equal work per block is what
    block-based kernels need for load balance (Gong et al., TODAES'22). Returns a keep mask
    shaped like ``scores``; inside each block no removed unit outscores a kept one.
    """
    scores = np.where(valid, scores, -np.inf)
    order = rank_descending(scores, axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :], axis=1)
    available = valid.sum(axis=1)
    base = np.minimum(np.floor(available * fraction + 1e-9).astype(np.int64), available)
    base_weight = float((base * unit_size).sum())
    has_next = base < available
    next_score = np.take_along_axis(scores, np.minimum(base, scores.shape[1] - 1)[:, None],
                                    axis=1)[:, 0]
    extra = select_prefix(np.where(has_next, next_score, -np.inf),
                          np.where(has_next, unit_size, 0), target - base_weight,
                          min_units=1 if base_weight == 0 else 0)
    return ranks < (base + extra)[:, None]


def explains(nonzeros: int, covered: int) -> bool:
    """Whether a structure's cover (``covered`` weights) accounts for a mask's
    ``nonzeros``, allowing 2% of kept weights that happen to be zero."""
    return covered <= nonzeros * (1.0 + RATE_TOLERANCE)


def largest_passing(passes: Callable[[int], bool], limit: int, cap: int = 32,
                    start: int = 1) -> int:
    """The largest power of two up to ``min(limit, cap)`` reached by doubling from
    ``start`` while ``passes`` holds. Block structures nest (a mask built of 8-row blocks
    is one of 4-row blocks), so doubling finds the largest block size."""
    size = start
    while size * 2 <= min(limit, cap) and passes(size * 2):
        size *= 2
    return size


def powers_of_two_down(largest: int, smallest: int = 1) -> list[int]:
    return [1 << i for i in range(largest.bit_length() - 1, -1, -1) if 1 << i >= smallest]


def block_candidates(passes: Callable[[tuple[int, int]], bool], extent: tuple[int, int],
                     min_side: int = 1, min_area: int = 2) -> list[tuple[int, int]]:
    """Blocks (power-of-two sides of at least ``min_side``) worth trying on a mask,
    largest area first. Each side is bounded by the largest size that passes with the
    other side at its minimum; if the smallest block fails, none can pass."""
    if min(extent) < min_side or not passes((min_side, min_side)):
        return []
    max_rows = largest_passing(lambda rows: passes((rows, min_side)), extent[0], start=min_side)
    max_cols = largest_passing(lambda cols: passes((min_side, cols)), extent[1], start=min_side)
    blocks = [(r, c) for r in powers_of_two_down(max_rows, min_side)
              for c in powers_of_two_down(max_cols, min_side) if r * c >= min_area]
    return sorted(blocks, key=lambda block: (-block[0] * block[1], -block[0]))


# ----------------------------------------------------------------- shapes and blocks


def as_matrix(weight: np.ndarray) -> np.ndarray:
    """A GEMM weight [out, in] as is; a 1x1 conv [F, C, 1, 1] as the GEMM [F, C]."""
    if weight.ndim == 2:
        return weight
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[:2])
    raise ValueError(f"expected a GEMM [out, in] or 1x1 conv weight, got shape {weight.shape}")


def as_conv(weight: np.ndarray) -> np.ndarray:
    """A conv weight [F, C, kh, kw] as is; a GEMM [M, K] as [M, K, 1, 1]."""
    if weight.ndim == 4:
        return weight
    if weight.ndim == 2:
        return weight.reshape(*weight.shape, 1, 1)
    raise ValueError(f"expected a conv [F, C, kh, kw] or GEMM weight, got shape {weight.shape}")


def as_bool_mask(weight_or_mask: np.ndarray) -> np.ndarray:
    """A boolean keep-mask: masks pass through, weights keep their nonzeros."""
    array = np.asarray(weight_or_mask)
    return array if array.dtype == bool else array != 0


def block_count(extent: int, size: int) -> int:
    return -(-extent // size)


def pad_to_blocks(array: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Zero-pad the leading axes of ``array`` to multiples of ``sizes`` (ragged edges)."""
    pads = [(0, block_count(n, s) * s - n) for n, s in zip(array.shape, sizes)]
    pads += [(0, 0)] * (array.ndim - len(sizes))
    return np.pad(array, pads)


def block_extents(extent: int, size: int) -> np.ndarray:
    """The real length of each block along an axis: ``size``, the last one ragged."""
    counts = np.full(block_count(extent, size), size)
    counts[-1] = extent - size * (len(counts) - 1)
    return counts


def blocked(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A 2-D array (padded) as [row_blocks, rows, col_blocks, cols]."""
    padded = pad_to_blocks(array, (rows, cols))
    return padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)


def unblocked(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`blocked`: back to ``shape``, padding dropped."""
    row_blocks, rows, col_blocks, cols = array.shape
    return array.reshape(row_blocks * rows, col_blocks * cols)[: shape[0], : shape[1]]
