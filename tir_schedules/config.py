"""Per-target-family knobs of the dense CPU schedules.

A target family (x86, arm) differs from another in these numbers, never in the math
or the shape of the schedule. They come from the target's features (the SIMD width
and how many vector registers hold the accumulators), so an untuned build starts from
a sensible point; every knob is a plain value that a tuner may override per kernel
(see :meth:`CpuScheduleConfig.with_knobs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuScheduleConfig:
    """Tile choices for one CPU target.

    ``lanes`` is the fp32 SIMD width (16 on AVX-512, 8 on AVX2, 4 on NEON): the
    largest channel block of the ``NCHW{c}c`` layout and the vector width of the
    kernels (a layer whose channels it does not divide gets a smaller power of two).
    ``vector_registers`` bounds the register tile: accumulators plus the weight vectors
    plus one broadcast must fit, or the kernel spills.
    """

    family: str  # "x86" or "arm"
    lanes: int  # fp32 lanes per vector, the largest c of NCHW{c}c
    vector_registers: int  # 16 (AVX2), 32 (AVX-512 and NEON)
    max_width_tile: int = 8  # output columns per register tile
    max_channel_tile: int = 4  # output-channel blocks per register tile
    parallel_min_flops: int = 200_000  # below this a kernel stays serial (fork-join ~15 us)
    unroll_reduction: bool = True  # unroll the innermost input-channel block loop
    # TVM places a constant-size local buffer on the stack (where LLVM promotes it to
    # registers) only up to 1 KiB; a bigger accumulator tile becomes a heap workspace
    # and every FMA stores to it.
    max_local_bytes: int = 1024
    # Sparse (gathered-tap) kernels, tir_schedules.sparse_conv:
    sparse_pixel_tile: int = 0  # max output columns per register tile (0: register budget)
    # parallel loop: "rows" (image, row), "rows_blocks" (image, row, filter block),
    # "blocks" (image, filter block, row), "auto" (blocks on maps of at most 64 pixels,
    # else rows_blocks)
    sparse_parallel: str = "auto"
    sparse_accumulator_scope: str = "global"  # see sparse_conv's module docstring
    # pattern kernel (entry form): filters per parallel step (0: by their products' bytes)
    sparse_filter_group: int = 0

    def max_accumulators(self, block: int) -> int:
        """Accumulator vectors of ``block`` fp32 lanes that stay in registers."""
        return max(1, self.max_local_bytes // (4 * block))

    def with_knobs(self, **knobs) -> "CpuScheduleConfig":
        """A copy with some knobs replaced (a tuner's sampled point)."""
        return dataclasses.replace(self, **knobs)


# The tuner's search space: per template family, the knobs it reads and the values
# tried (the default config's value is always tried first). ``npas-tvm tune`` enumerates
# the product per kernel, dedupes the schedules that come out identical, and measures
# the ones its cost model ranks best.
TUNABLE_KNOBS: dict[str, dict[str, tuple]] = {
    "conv2d": {"max_width_tile": (2, 4, 6, 8, 12, 16), "max_channel_tile": (1, 2, 4, 8),
               "unroll_reduction": (True, False), "parallel_min_flops": (0, 10**15)},
    "depthwise": {"max_width_tile": (2, 4, 8, 16), "parallel_min_flops": (0, 10**15)},
    "sparse_conv2d": {"sparse_pixel_tile": (0, 2, 4, 7, 8, 14, 16),
                      "sparse_parallel": ("auto", "rows", "rows_blocks", "blocks"),
                      "sparse_accumulator_scope": ("global", "local"),
                      "parallel_min_flops": (0, 10**15)},
    "sparse_dense": {"sparse_pixel_tile": (0, 2, 4, 8, 16),
                     "sparse_accumulator_scope": ("global", "local"),
                     "parallel_min_flops": (0, 10**15)},
    "sparse_pattern_entries": {"sparse_filter_group": (0, 1, 2, 4, 8, 16, 32),
                               "parallel_min_flops": (0, 10**15)},
    "reduction": {"lanes": (4, 8, 16), "parallel_min_flops": (0, 10**15)},
}


def knob_candidates(family: str, base: CpuScheduleConfig) -> list[CpuScheduleConfig]:
    """Every point of ``family``'s knob space, ``base`` first (``[base]`` if untunable)."""
    import itertools

    space = TUNABLE_KNOBS.get(family, {})
    names = list(space)
    configs = [base]
    for values in itertools.product(*(space[name] for name in names)):
        config = base.with_knobs(**dict(zip(names, values)))
        if config != base:
            configs.append(config)
    return configs


def default_config(spec) -> CpuScheduleConfig:
    """The untuned defaults for a :class:`~npas_tvm.targets.TargetSpec` (llvm targets)."""
    if spec.family == "arm":
        return CpuScheduleConfig("arm", lanes=4, vector_registers=32)
    registers = 32 if spec.simd_lanes >= 16 else 16
    return CpuScheduleConfig("x86", lanes=max(spec.simd_lanes, 4), vector_registers=registers)
