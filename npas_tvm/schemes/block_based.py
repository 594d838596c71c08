"""``block_based``: whole columns removed inside each block of a GEMM weight.

Block-based pruning of NPAS (Li et al., CVPR'21) and Gong et al., TODAES'22, for FC
layers, 1x1 convolutions and MatMuls with a constant weight, seen as a GEMM weight
[M (out), K (in)]. The weight is cut into blocks of ``br`` rows x ``bc`` columns; inside
each block whole columns are removed, so every row of a block keeps the same column
indices and the kept part is a dense sub-matrix over the gathered inputs (one dense
micro-kernel shared by the block's rows). With ``rows`` on, whole rows of a block go too
(block-based column-row pruning), splitting the rate evenly: sqrt(rate) by rows, the rest
by columns.

Our choices, where the papers leave it open: a column of a block scores the L2 norm of
its entries; every block keeps the same share of its columns (the floor of width / rate,
plus one more column in the blocks whose next column scores best, to hit the layer's
rate), because equal work per block balances the parallel kernel. Ragged edge blocks
keep the same share of their smaller width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import (
    CONV1X1, FC, Granularity, SchemeSpec, SpecError, as_matrix, balanced_select,
    block_candidates, block_extents, block_too_large, blocked, check_block, explains,
    kept_target, largest_passing, powers_of_two_down, unblocked)
from npas_tvm.schemes.registry import Scheme, register_scheme


@dataclass(frozen=True)
class BlockBasedSpec(SchemeSpec):
    block: tuple[int, int] = (8, 4)  # (rows = output channels, columns = input channels)
    rows: bool = False

    scheme = "block_based"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "block", check_block(self.block))
        if not isinstance(self.rows, bool):
            raise SpecError("rows", f"{self.rows!r} is not true or false")


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Real heights of the row blocks and widths of the column blocks."""
    return block_extents(shape[0], block[0]), block_extents(shape[1], block[1])


def _select_columns(squares: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                    target: float, equal_rows: bool = False) -> np.ndarray:
    """[Mb, Kb, bc] keep mask of block columns, the same share kept in every block.

    With ``equal_rows``, every row of blocks also keeps the same number of columns in
    total (give or take one): a row of blocks is the unit of work of the sparse kernel,
    so equal rows balance it. ``squares`` is [Mb, br, Kb, bc] and ``heights`` [Mb, Kb]
    the rows each block column holds (its unit size)."""
    row_blocks, _, col_blocks, cols = squares.shape
    scores = np.sqrt(squares.sum(axis=1))                                   # [Mb, Kb, bc]
    valid = np.broadcast_to(np.arange(cols)[None, :] < widths[:, None], (col_blocks, cols))
    held = (heights[:, :, None] * valid[None]).sum(axis=(1, 2)).astype(np.float64)  # [Mb]
    total = float(held.sum())
    unit = heights.max(axis=1).astype(np.float64)                           # [Mb]
    uniform = bool((heights == heights.max()).all())  # no ragged row of blocks
    if not (equal_rows and uniform and target >= total / row_blocks / 2):
        flat_valid = np.broadcast_to(valid[None], scores.shape).reshape(-1, cols)
        keep = balanced_select(scores.reshape(-1, cols), flat_valid, heights.reshape(-1),
                               target / total if total else 0.0, target)
        return keep.reshape(scores.shape)
    # Whole columns per row of blocks, apportioned (largest remainder) to hit the target.
    wanted = target * held / total / unit
    columns = np.floor(wanted + 1e-9)
    missing = int(np.floor((target - (columns * unit).sum()) / unit.mean() + 0.5))
    if columns.sum() + max(missing, 0) == 0:
        missing = 1  # a mask keeps at least one unit
    if missing > 0:
        columns[np.argsort(-(wanted - columns), kind="stable")[:missing]] += 1
    keep = np.zeros(scores.shape, dtype=bool)
    available = int(valid.sum())
    for row in range(row_blocks):
        if columns[row] <= 0:
            continue
        share = min(columns[row], available) / available
        keep[row] = balanced_select(scores[row], valid, heights[row], share,
                                    min(columns[row], available) * unit[row])
    return keep


def _select_rows(squares: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                 target: float) -> np.ndarray:
    """[Mb, br, Kb] keep mask of block rows, the same share kept in every block."""
    transposed = squares.transpose(2, 3, 0, 1)  # rows of blocks become columns
    keep = _select_columns(transposed, np.broadcast_to(widths[:, None], (len(widths),
                                                                         len(heights))),
                           heights, target)
    return keep.transpose(1, 2, 0)


def block_based_mask(weight: np.ndarray, spec: BlockBasedSpec) -> np.ndarray:
    matrix = as_matrix(weight)
    br, bc = spec.block
    squares = blocked(np.square(matrix, dtype=np.float64), br, bc)
    heights, widths = _grid(matrix.shape, spec.block)
    target = kept_target(matrix.size, spec.rate)
    if spec.rows:
        row_keep = _select_rows(squares, widths, heights, matrix.size / np.sqrt(spec.rate))
        squares = squares * row_keep[:, :, :, None]
        kept_rows = row_keep.sum(axis=1)                       # [Mb, Kb]
    else:
        row_keep = np.ones(squares.shape[:3], dtype=bool)
        kept_rows = np.broadcast_to(heights[:, None], (squares.shape[0], squares.shape[2]))
    col_keep = _select_columns(squares, kept_rows, widths, target, equal_rows=not spec.rows)
    mask = row_keep[:, :, :, None] & col_keep[:, None, :, :]
    return unblocked(mask, matrix.shape).reshape(weight.shape).copy()


def block_based_cover(mask: np.ndarray, spec: BlockBasedSpec) -> int:
    matrix = as_matrix(mask)
    blocks = blocked(matrix, *spec.block)
    columns = blocks.any(axis=1)                                   # [Mb, Kb, bc]
    if spec.rows:
        rows = blocks.any(axis=3)                                  # [Mb, br, Kb]
        return int((rows.sum(axis=1) * columns.sum(axis=2)).sum())
    heights, _ = _grid(matrix.shape, spec.block)
    return int((columns.sum(axis=(1, 2)) * heights).sum())


def block_based_granularity(shape: tuple[int, ...], spec: BlockBasedSpec) -> Granularity:
    heights, _ = _grid(shape[:2], spec.block)
    smallest = 1 if spec.rows else int(heights.min())
    return Granularity(step=int(heights.max()), min_kept=smallest, max_kept=int(np.prod(shape)))


def block_based_shape_check(shape: tuple[int, ...], spec: BlockBasedSpec) -> str | None:
    return block_too_large(spec.block, shape[:2], ("rows (output channels)",
                                                   "columns (input channels)"))


def balanced_width(matrix: np.ndarray, rows: int) -> int:
    """The widest power-of-two column block (up to 16) over which the full blocks of a
    column-pruned mask keep column counts that differ by at most one: the ``bc`` that a
    balanced selection used (or a multiple of it, which describes the same mask). Balance
    does not nest (4-column blocks balanced at 1-2 kept columns are not balanced as
    2-column blocks), so every width is tried."""
    def balanced(cols: int) -> bool:
        full_rows, full_cols = matrix.shape[0] // rows * rows, matrix.shape[1] // cols * cols
        counts = blocked(matrix[:full_rows, :full_cols], rows, cols).any(axis=1).sum(axis=2)
        return int(counts.max() - counts.min()) <= 1

    widths = powers_of_two_down(min(16, matrix.shape[1]))
    return next(cols for cols in widths if cols == 1 or balanced(cols))


def block_based_candidates(mask: np.ndarray) -> Iterator[BlockBasedSpec]:
    """Column blocks of as many rows as explain the mask, then row-and-column blocks."""
    matrix = as_matrix(mask) if mask.ndim == 2 or mask.shape[2:] == (1, 1) else None
    if matrix is None:
        return
    nonzeros = int(matrix.sum())

    def passes(block: tuple[int, int], rows: bool = False) -> bool:
        spec = BlockBasedSpec(block=block, rows=rows)
        return explains(nonzeros, block_based_cover(matrix, spec))

    column_rows = largest_passing(lambda rows: passes((rows, 1)), matrix.shape[0])
    if column_rows > 1:
        yield BlockBasedSpec(block=(column_rows, balanced_width(matrix, column_rows)))
    for block in block_candidates(lambda b: passes(b, rows=True), matrix.shape, min_side=2):
        yield BlockBasedSpec(block=block, rows=True)


BLOCK_BASED = register_scheme(Scheme(
    name="block_based", spec_type=BlockBasedSpec, mask=block_based_mask,
    cover=block_based_cover, granularity=block_based_granularity, kinds=(CONV1X1, FC),
    strength=40, paper="Li et al., NPAS, CVPR'21; Gong et al., TODAES'22",
    summary="whole columns (and optionally rows) removed inside each rows x cols block "
            "of a GEMM weight",
    shape_check=block_based_shape_check, candidates=block_based_candidates))
