"""``unaligned_block``: GR x 1 blocks along output channels that may start at any row.

Unaligned block pruning, UBP (Lee & Shin, "Unaligned Block Pruning", 2024), for 1x1
convolutions and FC layers seen as a GEMM weight [M (out), K (in)]. A kept block is GR
consecutive rows of one input column (GR x 1), starting at any row; blocks do not
overlap and do not cross the column's end. A block scores the sum of squares of its
entries and the layer keeps the M blocks (M from the rate) of largest total score. The
kernel stores per block (column, start row) and GR packed weights and accumulates
out[r:r+GR] += w * x[j]: latency close to aligned blocks, accuracy closer to unstructured.

Three selectors, one for each use:

* :func:`exact_blocks`: the optimum, a dynamic program over the columns laid end to end,
  O(rows * columns * M); the reference that the fast selector is tested against;
* :func:`bed_blocks`: Block Expansion and Division, the fast selector used by the mask.
  The paper's exact steps were not available; this is our version of its idea.
  *Expansion*: take the best-scored windows of the layer (as many as blocks to keep);
  overlapping ones merge into runs of rows. If the runs cannot hold the blocks, expand
  with the next-best windows and merge again. *Division*: divide each run into blocks
  optimally (the same dynamic program, on the run alone, for every block count), then
  share the layer's block budget between runs by the best marginal gain;
* :func:`aligned_blocks`: blocks starting at multiples of GR only, the aligned baseline
  that UBP must beat.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import (
    CONV1X1, FC, Granularity, SchemeSpec, SpecError, as_matrix, block_too_large, check_block,
    explains, kept_target, largest_passing, rank_descending)
from npas_tvm.schemes.registry import Scheme, register_scheme

DIVISION_CELLS = 1 << 24
EXPANSION_SLACK = 1.5
"""Expansion stops once the runs of candidate windows could hold 1.5x the blocks to keep:
with less room, division has too few alternatives to the strongest windows (0.93 of the
optimum on random layers at 1x); at 1.5x it matched the exact selector on all of them."""


@dataclass(frozen=True)
class UnalignedBlockSpec(SchemeSpec):
    block: tuple[int, int] = (4, 1)  # (GR rows along output channels, 1 column)

    scheme = "unaligned_block"

    def __post_init__(self) -> None:
        super().__post_init__()
        block = check_block(self.block)
        if block[1] != 1:
            raise SpecError("block", f"{list(block)}: unaligned blocks are GR x 1 (GR output "
                                     "channels of one input column); the second entry must be 1")
        object.__setattr__(self, "block", block)


# ----------------------------------------------------------------- shared pieces


def _columns(weight: np.ndarray) -> np.ndarray:
    """Squared weights as [K columns, M rows]: each column's rows contiguous."""
    return np.square(as_matrix(weight), dtype=np.float64).T


def window_scores(columns: np.ndarray, size: int) -> np.ndarray:
    """[K, M - size + 1]: the score of the window of ``size`` rows starting at each row."""
    sums = np.concatenate([np.zeros((columns.shape[0], 1)), np.cumsum(columns, axis=1)], axis=1)
    return sums[:, size:] - sums[:, :-size]


def block_budget(shape: tuple[int, ...], spec: UnalignedBlockSpec) -> int:
    """Blocks to keep: round(kept weights / GR), at least 1, at most what fits."""
    size = spec.block[0]
    capacity = shape[1] * (shape[0] // size)
    return int(min(max(1, round(kept_target(shape[0] * shape[1], spec.rate) / size)), capacity))


def rows_of_spans(columns: np.ndarray, starts: np.ndarray, sizes: np.ndarray | int,
                  shape: tuple[int, int]) -> np.ndarray:
    """Boolean [K, M] marking the rows covered by spans (column, start, size)."""
    delta = np.zeros((shape[0], shape[1] + 1), dtype=np.int64)
    np.add.at(delta, (columns, starts), 1)
    np.add.at(delta, (columns, starts + sizes), -1)
    return np.cumsum(delta, axis=1)[:, :-1] > 0


def _to_mask(weight: np.ndarray, columns: np.ndarray, starts: np.ndarray,
             size: int) -> np.ndarray:
    matrix = as_matrix(weight)
    covered = rows_of_spans(columns, starts, size, (matrix.shape[1], matrix.shape[0]))
    return covered.T.reshape(weight.shape).copy()


def blocks_score(weight: np.ndarray, mask: np.ndarray) -> float:
    """The selection objective: the sum of squares the mask keeps."""
    return float(np.square(weight, dtype=np.float64)[mask].sum())


def best_divisions(windows: np.ndarray, length: int, size: int,
                   most: int) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic program, for a batch of sequences of ``length`` rows: the best total score
    of exactly m non-overlapping windows, for m = 0..most, and the choices to rebuild them.

    ``windows[b, s]`` scores the window of sequence b starting at row s (-inf where none
    may start). Returns (best [batch, most + 1], taken [length + 1, batch, most + 1]).
    """
    batch = windows.shape[0]
    best = np.full((length + 1, batch, most + 1), -np.inf)
    best[0, :, 0] = 0.0
    taken = np.zeros((length + 1, batch, most + 1), dtype=bool)
    for end in range(1, length + 1):
        best[end] = best[end - 1]
        if end >= size:
            with_block = best[end - size, :, :-1] + windows[:, end - size, None]
            better = with_block > best[end, :, 1:]
            best[end, :, 1:] = np.where(better, with_block, best[end, :, 1:])
            taken[end, :, 1:] = better
    return best[length], taken


def rebuild_starts(taken: np.ndarray, count: int, size: int) -> list[int]:
    """The window starts of the ``count``-window optimum of one sequence of
    :func:`best_divisions` (``taken[:, b]``)."""
    starts, end = [], taken.shape[0] - 1
    while count > 0:
        if taken[end, count]:
            starts.append(end - size)
            end -= size
            count -= 1
        else:
            end -= 1
    return starts


# ----------------------------------------------------------------- selectors


def exact_blocks(weight: np.ndarray, spec: UnalignedBlockSpec) -> np.ndarray:
    """The optimal mask (exact DP over all columns laid end to end); small layers only."""
    columns = _columns(weight)
    size = spec.block[0]
    col_count, rows = columns.shape
    windows = np.full((col_count, rows), -np.inf)
    windows[:, : rows - size + 1] = window_scores(columns, size)  # none cross a column end
    budget = block_budget(as_matrix(weight).shape, spec)
    _, taken = best_divisions(windows.reshape(1, -1), col_count * rows, size, budget)
    flat = np.array(rebuild_starts(taken[:, 0], budget, size), dtype=np.int64)
    return _to_mask(weight, flat // rows, flat % rows, size)


def aligned_blocks(weight: np.ndarray, spec: UnalignedBlockSpec) -> np.ndarray:
    """The best blocks among those starting at multiples of GR (the aligned baseline)."""
    columns = _columns(weight)
    size = spec.block[0]
    aligned = window_scores(columns, size)[:, ::size]
    chosen = rank_descending(aligned)[: block_budget(as_matrix(weight).shape, spec)]
    col, slot = np.unravel_index(chosen, aligned.shape)
    return _to_mask(weight, col, slot * size, size)


def _runs(covered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of covered rows: (column, first row, end row) arrays."""
    edges = np.diff(np.pad(covered.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    col_starts, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return col_starts, starts, ends


def divide_runs(windows: np.ndarray, run_col: np.ndarray, run_start: np.ndarray,
                run_length: np.ndarray, size: int) -> tuple[list[np.ndarray], list]:
    """Division: every run's best score for each block count it can hold, and the
    choices to rebuild them. Runs of similar length share one batched dynamic program
    (in batches of at most ``DIVISION_CELLS`` table cells, to bound memory)."""
    gains: list[np.ndarray] = [np.zeros(1)] * len(run_col)
    choices: list = [None] * len(run_col)
    bucket = np.ceil(np.log2(np.maximum(run_length, 1))).astype(np.int64)
    batches = []
    for level in np.unique(bucket[run_length >= size]):
        members = np.nonzero((bucket == level) & (run_length >= size))[0]
        length = int(run_length[members].max())
        per_batch = max(1, DIVISION_CELLS // ((length + 1) * (length // size + 1)))
        batches += [members[i: i + per_batch] for i in range(0, len(members), per_batch)]
    for members in batches:
        length = int(run_length[members].max())
        batch = np.full((len(members), length - size + 1), -np.inf)
        for row, run in enumerate(members):
            count = run_length[run] - size + 1
            batch[row, :count] = windows[run_col[run], run_start[run]: run_start[run] + count]
        best, taken = best_divisions(batch, length, size, length // size)
        for row, run in enumerate(members):
            gains[run] = best[row, : run_length[run] // size + 1]
            choices[run] = (taken, row)
    return gains, choices


def bed_blocks(weight: np.ndarray, spec: UnalignedBlockSpec) -> np.ndarray:
    """Block Expansion and Division (see the module docstring)."""
    columns = _columns(weight)
    size = spec.block[0]
    windows = window_scores(columns, size)
    budget = block_budget(as_matrix(weight).shape, spec)
    ranking = rank_descending(windows)
    candidates = budget
    while True:  # expansion: enough top windows that their union holds the budget
        col, start = np.unravel_index(ranking[:candidates], windows.shape)
        _, union_start, union_end = _runs(rows_of_spans(col, start, size, columns.shape))
        shortfall = EXPANSION_SLACK * budget - int(((union_end - union_start) // size).sum())
        if shortfall <= 0 or candidates == ranking.size:
            break
        candidates = min(ranking.size, candidates + int(2 * shortfall) + 1)
    # Grow every window by ``size`` rows each side, so that division can also shift a
    # block onto the rows just beside a strong window.
    grown = np.maximum(start - size, 0)
    grown_size = np.minimum(start + 2 * size, columns.shape[1]) - grown
    run_col, run_start, run_end = _runs(rows_of_spans(col, grown, grown_size, columns.shape))

    gains, choices = divide_runs(windows, run_col, run_start, run_end - run_start, size)
    allotted = np.zeros(len(gains), dtype=np.int64)
    heap = [(-(g[1] - g[0]), i) for i, g in enumerate(gains) if len(g) > 1]
    heapq.heapify(heap)
    for _ in range(budget):
        _, run = heapq.heappop(heap)
        allotted[run] += 1
        if allotted[run] + 1 < len(gains[run]):
            step = gains[run][allotted[run] + 1] - gains[run][allotted[run]]
            heapq.heappush(heap, (-step, run))
    block_cols, block_starts = [], []
    for run in np.nonzero(allotted)[0]:
        taken, index = choices[run]
        for offset in rebuild_starts(taken[:, index], int(allotted[run]), size):
            block_cols.append(run_col[run])
            block_starts.append(run_start[run] + offset)
    return _to_mask(weight, np.array(block_cols, dtype=np.int64),
                    np.array(block_starts, dtype=np.int64), size)


# ----------------------------------------------------------------- the scheme


def unaligned_block_mask(weight: np.ndarray, spec: UnalignedBlockSpec) -> np.ndarray:
    return bed_blocks(weight, spec)


def fewest_blocks(mask: np.ndarray, size: int) -> int | None:
    """The fewest non-overlapping windows of ``size`` rows, none crossing a column end,
    that hold every True of a [M, K] mask; None if no such windows exist. A dynamic
    program over the rows, all columns at once."""
    rows = as_matrix(mask).T                     # [K, M]
    count = rows.shape[1]
    fewest = np.full((count + 1, rows.shape[0]), np.inf)
    fewest[0] = 0
    for end in range(1, count + 1):
        fewest[end] = np.where(rows[:, end - 1], np.inf, fewest[end - 1])
        if end >= size:
            fewest[end] = np.minimum(fewest[end], fewest[end - size] + 1)
    total = fewest[count].sum()
    return None if not np.isfinite(total) else int(total)


def unaligned_block_cover(mask: np.ndarray, spec: UnalignedBlockSpec) -> int | None:
    if mask.ndim == 4 and mask.shape[2:] != (1, 1):
        return None
    blocks = fewest_blocks(mask, spec.block[0])
    return None if blocks is None else blocks * spec.block[0]


def unaligned_block_granularity(shape: tuple[int, ...], spec: UnalignedBlockSpec) -> Granularity:
    size = spec.block[0]
    return Granularity(step=size, min_kept=size, max_kept=shape[1] * (shape[0] // size) * size)


def unaligned_block_shape_check(shape: tuple[int, ...], spec: UnalignedBlockSpec) -> str | None:
    return block_too_large(spec.block, shape[:2], ("rows (output channels)",
                                                   "columns (input channels)"))


def unaligned_block_candidates(mask: np.ndarray) -> Iterator[UnalignedBlockSpec]:
    if mask.ndim == 4 and mask.shape[2:] != (1, 1):
        return
    nonzeros = int(mask.sum())

    def passes(size: int) -> bool:
        blocks = fewest_blocks(mask, size)
        return blocks is not None and explains(nonzeros, blocks * size)

    size = largest_passing(passes, mask.shape[0])
    if size > 1:
        yield UnalignedBlockSpec(block=(size, 1))


UNALIGNED_BLOCK = register_scheme(Scheme(
    name="unaligned_block", spec_type=UnalignedBlockSpec, mask=unaligned_block_mask,
    cover=unaligned_block_cover, granularity=unaligned_block_granularity,
    kinds=(CONV1X1, FC), strength=20, paper="Lee & Shin, UBP, 2024",
    summary="GR x 1 blocks along output channels starting at any row (BED selection)",
    shape_check=unaligned_block_shape_check, candidates=unaligned_block_candidates))
