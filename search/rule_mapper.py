"""Rule-based mapping of pruning schemes to layers (Gong et al., "Automatic Mapping of
the Best-Suited DNN Pruning Schemes for Real-Time Mobile Acceleration", TODAES'22).

Before (or instead of) a search, each layer gets a scheme, a block size and a rate from
its type and shape alone. The rules and why:

* **Depthwise convolutions stay dense.** Each filter has kh*kw weights on one channel:
  there is no block to share and no reuse to gain; the layer is memory-bound and a few
  percent of the MACs, so a sparse kernel cannot beat the dense one.
* **Grouped (non-depthwise) convolutions stay dense.** Blocks would straddle groups
  that read different inputs, losing the load reuse that makes blocks fast.
* **Tiny layers stay dense** (fewer than ``SMALL_LAYER`` weights, e.g. a stem conv on
  3 channels or a 16 x 32 projection): a block of 8 x 4 is a sizeable share of such a
  layer, so each removed block costs accuracy, for a negligible share of the weights.
* **3x3 convolutions take pattern pruning** for rates from 2.25 (what patterns alone
  give) to ``PATTERN_MAX_RATE``: 4-entry patterns keep accuracy best and map to
  pattern-specialized code (PatDNN, ASPLOS'20). Below 2.25 patterns cannot go; above 5
  most of the rate would come from connectivity pruning (whole kernels, irregular), so
  **block-punched** takes over there: the same positions removed across an 8 x 4 block
  keep SIMD-friendly regularity at any rate (NPAS, CVPR'21).
* **Other KxK convolutions** (5x5, 7x7) take block-punched (patterns are 3x3 only).
* **1x1 convolutions and FC layers take block-based pruning**: they are GEMMs, and
  blocks of whole columns give dense micro-kernels over gathered inputs. Rows are 16
  (four 4-lane fp32 NEON vectors) on wide layers, else 8 or 4, preferring sizes that
  divide the output channels; 4 columns per block.
* **For a known target the rules follow its kernels** (:class:`RuleTarget`): block rows
  (the filters a sparse kernel vectorizes over) prefer the target's fp32 SIMD width, and
  a 3x3 conv takes patterns only if the target's pattern kernel runs at 0.8 of
  block-punched's speed or better (``SparseKernel.relative_speed``, measured by the
  kernel benchmarks); otherwise block-punched: a pruned layer that runs slowly gives
  back what the pruning won.
* **The first and last layers are pruned lighter** (half the extra rate, snapped down to
  the search's rates): the first sees the raw image with few channels and the last
  produces the logits; both are the most accuracy-sensitive per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from npas_tvm.errors import PlanError
from npas_tvm.plan import Plan
from npas_tvm.schemes import (
    CONV, CONV1X1, DEPTHWISE, FC, GROUPED, BlockBasedSpec, BlockPunchedSpec, DenseSpec,
    PatternSpec, SchemeSpec)

SEARCH_RATES = (1.0, 2.0, 2.5, 3.0, 5.0, 7.0, 10.0)
"""The per-layer rates of the NPAS search space."""
SMALL_LAYER = 1024
PATTERN_MIN_RATE = 2.25
PATTERN_MAX_RATE = 5.0
GEMM_BLOCK_ROWS = (16, 8, 4)
WIDE_LAYER = 256  # output channels from which 16-row blocks are preferred
BLOCK_COLS = (4, 2, 1)
PUNCHED_FILTERS = (8, 4, 2, 1)
PATTERN_SPEED_SHARE = 0.8
"""With a target, 3x3 convs take patterns only where the pattern kernel runs at this
share of block-punched's speed or more."""


@dataclass(frozen=True)
class RuleTarget:
    """What the rules need to know of the target: its fp32 SIMD width, and which
    schemes have a sparse kernel there."""

    lanes: int = 4
    has_kernel: Callable[[str], bool] = lambda scheme: True
    speed: Callable[[str], float] = lambda scheme: 1.0
    """A scheme's kernel FLOP rate relative to the dense kernel (``relative_speed``)."""

    @classmethod
    def for_spec(cls, spec) -> "RuleTarget":
        """From an ``npas_tvm.targets.TargetSpec``, with the registered kernels."""
        from relay_passes.sparse_kernels import sparse_kernel_for

        def kernel(scheme):
            return sparse_kernel_for(scheme, spec.family)

        return cls(lanes=max(int(spec.simd_lanes or 4), 4),
                   has_kernel=lambda scheme: kernel(scheme) is not None,
                   speed=lambda scheme: kernel(scheme).relative_speed if kernel(scheme)
                   else 0.0)

    def pattern_pays(self) -> bool:
        """Whether the target's pattern kernel runs near block-punched's speed: patterns
        keep accuracy better, but a layer that runs slower gives back the latency."""
        return self.has_kernel("pattern") and \
            self.speed("pattern") >= PATTERN_SPEED_SHARE * self.speed("block_punched")


@dataclass(frozen=True)
class RuleChoice:
    """One layer's rule outcome and the rule that gave it (for the ``plan`` table)."""

    layer: str
    spec: SchemeSpec
    reason: str


def lighter_rate(rate: float) -> float:
    """Half the extra rate, snapped down to the search's rates (3 -> 2, 5 -> 3, 10 -> 5)."""
    wanted = 1.0 + (rate - 1.0) / 2.0
    return max(r for r in SEARCH_RATES if r <= wanted)


def pick_size(extent: int, sizes: Sequence[int]) -> int:
    """The first of ``sizes`` that divides ``extent``, else the first that fits."""
    for size in sizes:
        if size <= extent and extent % size == 0:
            return size
    return next((size for size in sizes if size <= extent), 1)


def _lanes_first(sizes: Sequence[int], lanes: int | None) -> tuple[int, ...]:
    """``sizes`` with the SIMD width (if given and among them) tried first."""
    if lanes is None or lanes not in sizes:
        return tuple(sizes)
    return (lanes, *(size for size in sizes if size != lanes))


def gemm_block(out_channels: int, in_channels: int,
               lanes: int | None = None) -> tuple[int, int]:
    rows = GEMM_BLOCK_ROWS if out_channels >= WIDE_LAYER else GEMM_BLOCK_ROWS[1:]
    if lanes is not None:
        rows = _lanes_first(GEMM_BLOCK_ROWS, lanes)
    return pick_size(out_channels, rows), pick_size(in_channels, BLOCK_COLS)


def rule_for(layer, rate: float, target: RuleTarget | None = None) -> RuleChoice:
    """The rules above, for one layer (an ``npas_tvm.layers.Layer``); ``target`` None
    gives the target-independent rules."""
    name, kind, shape = layer.name, layer.kind, layer.weight_shape
    if rate <= 1.0:
        return RuleChoice(name, DenseSpec(), "rate 1")
    if kind == DEPTHWISE:
        return RuleChoice(name, DenseSpec(), "depthwise: no block reuse, memory-bound")
    if kind == GROUPED:
        return RuleChoice(name, DenseSpec(), "grouped: blocks would straddle groups")
    if layer.params < SMALL_LAYER:
        return RuleChoice(name, DenseSpec(), f"small (< {SMALL_LAYER} weights)")
    reason = ""
    if layer.first or layer.last:
        rate = lighter_rate(rate)
        reason = ("first layer, lighter; " if layer.first else "last layer, lighter; ")
        if rate <= 1.0:
            return RuleChoice(name, DenseSpec(), reason + "rate 1")
    if kind in (CONV1X1, FC):
        lanes = target.lanes if target else None
        return RuleChoice(name, BlockBasedSpec(rate=rate, block=gemm_block(*shape[:2], lanes)),
                          reason + "GEMM: block-based columns")
    pattern_runs = target is None or target.pattern_pays()
    if kind == CONV and shape[2:] == (3, 3) and PATTERN_MIN_RATE <= rate <= PATTERN_MAX_RATE \
            and pattern_runs:
        return RuleChoice(name, PatternSpec(rate=rate), reason + "3x3: pattern + connectivity")
    filters = _lanes_first((16, *PUNCHED_FILTERS), target.lanes) if target else PUNCHED_FILTERS
    block = (pick_size(shape[0], filters), pick_size(shape[1], BLOCK_COLS))
    if shape[2:] != (3, 3):
        why = "KxK: no 3x3 patterns"
    elif not pattern_runs:
        why = ("3x3, the target's pattern kernel is slower" if target.has_kernel("pattern")
               else "3x3, no pattern kernel for the target")
    else:
        why = "3x3 outside pattern's 2.25-5x"
    return RuleChoice(name, BlockPunchedSpec(rate=rate, block=block),
                      reason + f"{why}: block-punched")


def rule_choices(layers: Iterable, rate: float = 3.0,
                 target: RuleTarget | None = None) -> list[RuleChoice]:
    if not isinstance(rate, (int, float)) or rate < 1:
        raise PlanError(f"--rate {rate}: must be a number >= 1 (rate = total / kept weights)")
    return [rule_for(layer, float(rate), target) for layer in layers]


def rule_plan(layers: Iterable, rate: float = 3.0, target: RuleTarget | None = None) -> Plan:
    """A plan from the rules: every layer listed, default dense."""
    choices = rule_choices(layers, rate, target)
    return Plan(layers={choice.layer: choice.spec for choice in choices},
                meta={"source": "rule", "rate": float(rate)})


def uniform_plan(layers: Iterable, rate: float, target: RuleTarget | None = None) -> Plan:
    """Every layer at the same ``rate``, with the scheme the rules give its type.

    The benchmarks' fixed-rate plans: unlike :func:`rule_plan`, the first and last
    layers are not spared; depthwise, grouped and tiny layers still stay dense (no
    block reuse, or too small for a block)."""
    import dataclasses

    choices = [rule_for(dataclasses.replace(layer, first=False, last=False), float(rate),
                        target) for layer in layers]
    return Plan(layers={choice.layer: choice.spec for choice in choices},
                meta={"source": "uniform", "rate": float(rate)})

