"""The search loop: strategies propose plans, the evaluators score them, a log keeps all.

Three strategies share one loop, one budget (accuracy evaluations, the expensive part)
and one reward, so their results compare directly:

* ``npas``: the rule-based mapper's plan first, then a Q-learning agent proposes
  ``proposals`` plans per step and Bayesian optimization (a GP over plan features,
  expected improvement) picks the one worth a fine-tune (NPAS phase 2).
* ``random``: uniformly random plans among those the latency model predicts within
  the budget (rejection sampling), a strong random baseline.
* ``rule``: the rule mapper's plans (and its fixed-rate plans) from the lightest that
  the latency model predicts within the budget, in order.

The reward is accuracy minus a penalty for predicted latency over the budget::

    reward = accuracy - PENALTY * max(0, latency_ms / budget_ms - 1)

so a plan that meets the budget is judged by accuracy alone, and one that misses it by
10% loses 0.2: no accuracy gain on digits pays for that.

Every evaluation is appended to a JSON-lines log (``SearchLog``) before the next one
starts; re-running with the same log replays what is there into the strategy and goes
on, so an interrupt loses at most the evaluation under way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from npas_tvm.errors import NpasError
from npas_tvm.plan import Plan
from npas_tvm.schemes import SchemeSpec
from search.bayes import GaussianProcess, expected_improvement
from search.qlearning import QLearningAgent
from search.rule_mapper import SEARCH_RATES, RuleTarget, rule_plan, uniform_plan
from search.space import choices_of_plan, plan_from_choices

PENALTY = 2.0
STRATEGIES = ("npas", "random", "rule")


class SearchError(NpasError):
    """A search that cannot start or continue (a log of another search, no layers)."""


def reward(accuracy: float, latency_ms: float, budget_ms: float,
           penalty: float = PENALTY) -> float:
    """Accuracy (0..1), less ``penalty`` per unit of relative latency over budget."""
    return accuracy - penalty * max(0.0, latency_ms / budget_ms - 1.0)


@dataclass
class Evaluation:
    """One evaluated plan, as the log stores it."""

    source: str
    step: int
    choices: list[int]
    accuracy: float
    latency_ms: float
    reward: float
    seconds: float
    epochs: int = 0
    kind: str = "eval"

    @property
    def meets(self) -> bool:
        return self.reward >= self.accuracy - 1e-12


def space_digest(space: dict[str, list[SchemeSpec]]) -> str:
    """A short hash of the action space, so a log is only resumed by the same search."""
    text = json.dumps({name: [spec.to_json() for spec in actions]
                       for name, actions in space.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SearchLog:
    """A JSON-lines file: one header naming the search, then one line per evaluation.

    Lines are flushed and fsynced as they are written; a partial last line (killed
    mid-write) is ignored on reading.
    """

    def __init__(self, path: str, header: dict):
        self.path = path
        self.header = dict(header, kind="search")
        self.evaluations: list[Evaluation] = []
        self.notes: dict[str, dict] = {}
        if os.path.exists(path):
            self._read()
        else:
            self._write(self.header)

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if not records or records[0].get("kind") != "search":
            raise SearchError(f"{self.path}: not a search log (no header line); move it "
                              "away or choose another --out")
        for key in ("model", "target", "space", "budget_ms", "data"):
            if records[0].get(key) != self.header.get(key):
                raise SearchError(
                    f"{self.path}: a log of another search ({key} was "
                    f"{records[0].get(key)!r}, now {self.header.get(key)!r}); choose "
                    "another --out, or --restart to discard it")
        for record in records[1:]:
            if record.get("kind") == "eval":
                self.evaluations.append(Evaluation(**record))
            elif record.get("kind") == "note":
                self.notes[record["name"]] = record

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, evaluation: Evaluation) -> None:
        self._write(asdict(evaluation))
        self.evaluations.append(evaluation)

    def note(self, name: str, **values) -> None:
        """A named fact of the run (the dense accuracy, a measured latency)."""
        record = {"kind": "note", "name": name, **values}
        self._write(record)
        self.notes[name] = record

    def of(self, source: str) -> list[Evaluation]:
        return [e for e in self.evaluations if e.source == source]


def best_of(evaluations: Iterable[Evaluation]) -> Evaluation | None:
    """The highest reward (ties: the faster plan)."""
    return max(evaluations, key=lambda e: (e.reward, -e.latency_ms), default=None)


# -- plan features for the GP ------------------------------------------------------------

def plan_features(space: dict[str, list[SchemeSpec]], choices: Sequence[int],
                  weights: dict[str, float] | None = None) -> np.ndarray:
    """Per searchable layer: log2 of its rate, and whether it takes patterns.

    ``weights`` (a layer's share of the parameters, say) scales each layer's features,
    so the GP's distance sees a big layer's change as a big change."""
    out = []
    for (name, actions), index in zip(space.items(), choices):
        if len(actions) < 2:
            continue
        spec = actions[index]
        scale = math.sqrt(weights.get(name, 1.0)) if weights else 1.0
        rate = float(getattr(spec, "rate", 1.0) or 1.0)
        out += [scale * math.log2(rate), scale * float(spec.scheme == "pattern")]
    return np.asarray(out, dtype=np.float64)


# -- strategies ----------------------------------------------------------------------------

@dataclass
class SearchContext:
    """What every strategy may use: the space and the cheap latency prediction."""

    space: dict[str, list[SchemeSpec]]
    latency: Callable[[Plan], float]
    budget_ms: float
    seed: int = 0
    layers: list = field(default_factory=list)
    target: RuleTarget | None = None
    weights: dict[str, float] | None = None

    def plan(self, choices: Sequence[int], source: str) -> Plan:
        return plan_from_choices(self.space, choices, source)

    def predicted(self, choices: Sequence[int]) -> float:
        return self.latency(self.plan(choices, "search"))


class Strategy:
    """Proposes the next plan to evaluate and learns from each evaluation."""

    name = ""

    def __init__(self, context: SearchContext):
        self.context = context

    def propose(self, step: int, budget: int) -> list[int] | None:
        """The next plan's choices, or None when the strategy has nothing left."""
        raise NotImplementedError

    def observe(self, evaluation: Evaluation) -> None:
        pass


def rule_candidates(context: SearchContext) -> list[list[int]]:
    """The rule mapper's plans at the search's rates (and fixed-rate plans), lightest
    first among those predicted within the budget, then the rest by latency."""
    plans = []
    for rate in SEARCH_RATES[1:]:
        plans.append(rule_plan(context.layers, rate, context.target))
        plans.append(uniform_plan(context.layers, rate, context.target))
    seen, candidates = set(), []
    for plan in plans:
        choices = choices_of_plan(context.space, plan)
        if tuple(choices) not in seen:
            seen.add(tuple(choices))
            candidates.append((context.predicted(choices), choices))
    within = [c for c in candidates if c[0] <= context.budget_ms]
    beyond = sorted((c for c in candidates if c[0] > context.budget_ms), key=lambda c: c[0])
    within.sort(key=lambda c: -c[0])      # the slowest within budget prunes least
    return [choices for _, choices in within + beyond]


class RuleStrategy(Strategy):
    name = "rule"

    def __init__(self, context: SearchContext):
        super().__init__(context)
        self.queue = rule_candidates(context)
        self.done: set[tuple[int, ...]] = set()

    def propose(self, step, budget):
        while self.queue:
            choices = self.queue.pop(0)
            if tuple(choices) not in self.done:
                return choices
        return None

    def observe(self, evaluation):
        self.done.add(tuple(evaluation.choices))


class RandomStrategy(Strategy):
    name = "random"
    tries = 2000

    def __init__(self, context: SearchContext):
        super().__init__(context)
        self.rng = random.Random(context.seed)

    def propose(self, step, budget):
        sizes = [len(actions) for actions in self.context.space.values()]
        fastest = None
        for _ in range(self.tries):
            choices = [self.rng.randrange(size) for size in sizes]
            latency = self.context.predicted(choices)
            if latency <= self.context.budget_ms:
                return choices
            if fastest is None or latency < fastest[0]:
                fastest = (latency, choices)
        return fastest[1]


class NpasStrategy(Strategy):
    """Q-learning proposes, Bayesian optimization chooses (NPAS phase 2).

    Each step the agent proposes ``proposals`` plans (epsilon-greedy with MetaQNN's
    schedule); the latency model prices each at no cost; a GP fitted to the evaluated
    plans' accuracies gives each proposal a mean and a spread, the known latency penalty
    is subtracted, and the proposal with the largest expected improvement of the reward
    is evaluated. The agent learns from the evaluated reward (with replay) and, at a
    smaller rate, from the GP's predicted reward of the proposals it did not get to
    evaluate, so it also learns where the budget lies without spending evaluations.
    """

    name = "npas"
    proposals = 128
    surrogate_alpha = 0.02

    def __init__(self, context: SearchContext, initial: int = 3):
        super().__init__(context)
        sizes = [len(actions) for actions in context.space.values()]
        self.agent = QLearningAgent(sizes, seed=context.seed)
        self.initial = initial
        self.seen: dict[tuple[int, ...], Evaluation] = {}
        self.seeds = rule_candidates(context)[:1]

    def _fit(self):
        evaluations = list(self.seen.values())
        x = np.stack([self._features(e.choices) for e in evaluations])
        y = np.asarray([e.accuracy for e in evaluations])
        return GaussianProcess().fit(x, y)

    def _features(self, choices):
        return plan_features(self.context.space, choices, self.context.weights)

    def propose(self, step, budget):
        if self.seeds:
            return self.seeds.pop(0)
        self.agent.epsilon = self.agent.schedule(step, budget)
        pool: dict[tuple[int, ...], float] = {}
        for _ in range(self.proposals * 4):
            choices = tuple(self.agent.propose())
            if choices not in self.seen and choices not in pool:
                pool[choices] = self.context.predicted(choices)
            if len(pool) >= self.proposals:
                break
        if not pool:
            return None
        candidates = list(pool)
        penalties = np.asarray([PENALTY * max(0.0, pool[c] / self.context.budget_ms - 1.0)
                                for c in candidates])
        if len(self.seen) < self.initial:
            feasible = [c for c, p in zip(candidates, penalties) if p == 0.0]
            return list(self.agent._rng.choice(feasible or candidates))
        gp = self._fit()
        mean, std = gp.predict(np.stack([self._features(c) for c in candidates]))
        best = max(e.reward for e in self.seen.values())
        gain = expected_improvement(mean - penalties, std, best)
        for choices, acc in zip(candidates, mean):
            self.agent.learn(choices, reward(float(acc), pool[choices], self.context.budget_ms),
                             alpha=self.surrogate_alpha)
        return list(candidates[int(np.argmax(gain))])

    def observe(self, evaluation):
        self.seen[tuple(evaluation.choices)] = evaluation
        self.agent.observe(evaluation.choices, evaluation.reward)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (NpasStrategy, RandomStrategy, RuleStrategy)}


def run_strategy(name: str, context: SearchContext, evaluate: Callable[[Plan], object],
                 budget: int, log: SearchLog, *, progress: bool = True,
                 on_evaluated: Callable[[Evaluation, object], None] | None = None
                 ) -> list[Evaluation]:
    """Run one strategy for ``budget`` evaluations, resuming from ``log``.

    ``evaluate(plan)`` returns an object with ``accuracy`` (0..1) and, optionally,
    ``epochs``; ``on_evaluated(evaluation, result)`` runs before the log line is
    written (the driver saves the best weights there, so a logged best always has them).
    """
    if name not in STRATEGY_CLASSES:
        raise SearchError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    strategy = STRATEGY_CLASSES[name](context)
    done = log.of(name)
    for evaluation in done:
        strategy.observe(evaluation)
    bar = _progress(budget, len(done), f"search ({name})", progress)
    _describe(bar, done)
    try:
        for step in range(len(done), budget):
            choices = strategy.propose(step, budget)
            if choices is None:
                break
            plan = context.plan(choices, name)
            latency = context.latency(plan)
            start = time.perf_counter()
            result = evaluate(plan)
            evaluation = Evaluation(
                source=name, step=step, choices=[int(c) for c in choices],
                accuracy=float(result.accuracy), latency_ms=float(latency),
                reward=reward(float(result.accuracy), latency, context.budget_ms),
                seconds=round(time.perf_counter() - start, 2),
                epochs=int(getattr(result, "epochs", 0)))
            if on_evaluated is not None:
                on_evaluated(evaluation, result)
            log.append(evaluation)
            strategy.observe(evaluation)
            done.append(evaluation)
            if bar is not None:
                bar.update(1)
                _describe(bar, done)
    finally:
        if bar is not None:
            bar.close()
    return done


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="plan", leave=True)


def _describe(bar, done: list[Evaluation]) -> None:
    best = best_of(done)
    if bar is not None and best is not None:
        bar.set_postfix_str(f"best {100 * best.accuracy:.2f}% @ {best.latency_ms:.2f} ms"
                            + ("" if best.meets else " (over budget)"))
