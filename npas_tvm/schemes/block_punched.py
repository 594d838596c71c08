"""``block_punched``: kernel positions removed through whole blocks of filters x channels.

Block-punched pruning of NPAS (Li et al., CVPR'21) and of Gong et al., "Automatic Mapping
of the Best-Suited DNN Pruning Schemes for Real-Time Mobile Acceleration", TODAES'22.
A conv weight [F, C, kh, kw] is cut into blocks of ``bf`` consecutive filters x ``bc``
consecutive input channels. Kernel position k of a block scores the sum over the block's
channels of the L2 norm over its filters of W[f, c, k]; the lowest-scored (block,
position) pairs of the layer are removed for every filter and channel of their block
("punched through"). All filters of a block then read the same input positions: the
input is loaded once per block and reused across its filters, with block rows as SIMD
lanes. On a 1x1 conv this removes whole bf x bc blocks. Ragged edge blocks (F % bf or
C % bc nonzero) are smaller blocks, scored the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from npas_tvm.schemes._core import (
    CONV, CONV1X1, DEPTHWISE, GROUPED, Granularity, SchemeSpec, as_conv,
    block_candidates, block_extents, block_too_large, check_block, explains,
    kept_target, pad_to_blocks, select_prefix)
from npas_tvm.schemes.registry import Scheme, register_scheme


@dataclass(frozen=True)
class BlockPunchedSpec(SchemeSpec):
    block: tuple[int, int] = (8, 4)  # (filters, input channels)

    scheme = "block_punched"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "block", check_block(self.block))


def _by_block(array: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[F, C, kh, kw] -> padded [F_blocks, bf, C_blocks, bc, kh * kw]."""
    bf, bc = block
    padded = pad_to_blocks(array.reshape(array.shape[0], array.shape[1], -1), block)
    return padded.reshape(padded.shape[0] // bf, bf, padded.shape[1] // bc, bc, -1)


def _unit_sizes(shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """Weights per (filter block, channel block) unit position, ragged edges included."""
    return np.outer(block_extents(shape[0], block[0]), block_extents(shape[1], block[1]))


def position_scores(weight: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[F_blocks, C_blocks, kh * kw]: sum over channels of the L2 norm over filters."""
    squares = _by_block(np.square(as_conv(weight), dtype=np.float64), block)
    return np.sqrt(squares.sum(axis=1)).sum(axis=2)


def block_punched_mask(weight: np.ndarray, spec: BlockPunchedSpec) -> np.ndarray:
    conv = as_conv(weight)
    keep = select_prefix(position_scores(conv, spec.block),
                         _unit_sizes(conv.shape, spec.block)[:, :, None],
                         kept_target(conv.size, spec.rate))
    bf, bc = spec.block
    full = np.broadcast_to(keep[:, None, :, None, :], (keep.shape[0], bf, keep.shape[1], bc,
                                                       keep.shape[2]))
    full = full.reshape(keep.shape[0] * bf, keep.shape[1] * bc, -1)
    return full[: conv.shape[0], : conv.shape[1]].reshape(weight.shape).copy()


def block_punched_cover(mask: np.ndarray, spec: BlockPunchedSpec) -> int:
    conv = as_conv(mask)
    kept = _by_block(conv, spec.block).any(axis=(1, 3))
    return int((kept * _unit_sizes(conv.shape, spec.block)[:, :, None]).sum())


def block_punched_granularity(shape: tuple[int, ...], spec: BlockPunchedSpec) -> Granularity:
    sizes = _unit_sizes(shape, spec.block)
    return Granularity(step=int(sizes.max()), min_kept=int(sizes.min()),
                       max_kept=int(np.prod(shape)))


def block_punched_shape_check(shape: tuple[int, ...], spec: BlockPunchedSpec) -> str | None:
    return block_too_large(spec.block, shape[:2], ("filters", "input channels per group"))


def block_punched_candidates(mask: np.ndarray) -> Iterator[BlockPunchedSpec]:
    """Largest blocks first; none on 1x1 kernels, where block_based names the structure."""
    if mask.ndim != 4 or mask.shape[2:] == (1, 1):
        return
    nonzeros = int(mask.sum())

    def passes(block: tuple[int, int]) -> bool:
        return explains(nonzeros, block_punched_cover(mask, BlockPunchedSpec(block=block)))

    for block in block_candidates(passes, mask.shape[:2]):
        yield BlockPunchedSpec(block=block)


BLOCK_PUNCHED = register_scheme(Scheme(
    name="block_punched", spec_type=BlockPunchedSpec, mask=block_punched_mask,
    cover=block_punched_cover, granularity=block_punched_granularity,
    kinds=(CONV, CONV1X1, DEPTHWISE, GROUPED), strength=50,
    paper="Li et al., NPAS, CVPR'21; Gong et al., TODAES'22",
    summary="the same kernel positions removed across a block of filters x channels",
    shape_check=block_punched_shape_check, candidates=block_punched_candidates))

