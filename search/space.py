"""The search space: the per-layer actions (scheme x rate x block) a searcher picks from.

One place decides what a layer may become, so the Q-learning agent, random search, the
latency model's training records and the accuracy evaluator all see the same choices::

    >>> [spec.describe() for spec in layer_actions(layer, RuleTarget(lanes=16))]
    ['dense', 'block_punched 16x4 @2x', 'pattern @2.5x', 'block_punched 16x4 @2.5x', ...]

A layer the target cannot run sparse (depthwise, grouped, tiny) has the dense action
only. Blocks follow the rule mapper (the target's SIMD width first); a 3x3 conv may take
patterns at the rates patterns reach (2.25x to 5x) where the target has a pattern kernel,
and block-punched at every rate. Filter pruning is left out: it changes the consumers'
shapes, so its latency is not a sum over layers.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from npas_tvm.plan import Plan
from npas_tvm.schemes import CONV, DenseSpec, PatternSpec, SchemeSpec
from search.rule_mapper import (
    PATTERN_MAX_RATE, PATTERN_MIN_RATE, SEARCH_RATES, RuleTarget, rule_for)


def layer_actions(layer, target: RuleTarget | None = None,
                  rates: Sequence[float] = SEARCH_RATES) -> list[SchemeSpec]:
    """The specs one layer (an ``npas_tvm.layers.Layer``) may take, dense first."""
    actions: list[SchemeSpec] = [DenseSpec()]
    plain = dataclasses.replace(layer, first=False, last=False)
    pattern_ok = target is None or target.has_kernel("pattern")
    for rate in rates:
        if rate <= 1.0:
            continue
        spec = rule_for(plain, float(rate), target).spec
        if spec.scheme == "dense":
            return actions          # depthwise, grouped or tiny: dense at every rate
        if layer.kind == CONV and layer.weight_shape[2:] == (3, 3):
            if pattern_ok and PATTERN_MIN_RATE <= rate <= PATTERN_MAX_RATE \
                    and spec.scheme != "pattern":
                actions.append(PatternSpec(rate=float(rate)))
            if spec.scheme == "pattern":
                actions.append(spec)
                spec = rule_for(plain, float(rate),
                                dataclasses.replace(target or RuleTarget(),
                                                    has_kernel=lambda s: s != "pattern")).spec
        actions.append(spec)
    return actions


def search_space(layers: Iterable, target: RuleTarget | None = None,
                 rates: Sequence[float] = SEARCH_RATES) -> dict[str, list[SchemeSpec]]:
    """``{layer name: actions}`` for every layer, in model order."""
    return {layer.name: layer_actions(layer, target, rates) for layer in layers}


def plan_from_choices(space: dict[str, list[SchemeSpec]], choices: Sequence[int],
                      source: str = "search") -> Plan:
    """A plan from one action index per layer of ``space`` (in its order)."""
    names = list(space)
    if len(choices) != len(names):
        raise ValueError(f"{len(choices)} choices for {len(names)} layers")
    return Plan(layers={name: space[name][index] for name, index in zip(names, choices)},
                meta={"source": source})


def choices_of_plan(space: dict[str, list[SchemeSpec]], plan: Plan) -> list[int]:
    """The action indices of ``plan`` (a spec outside the space maps to dense)."""
    out = []
    for name, actions in space.items():
        spec = plan.spec_for(name)
        out.append(next((i for i, action in enumerate(actions) if action == spec), 0))
    return out
