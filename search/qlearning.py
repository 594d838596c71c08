"""A Q-learning agent that proposes per-layer pruning plans (NPAS phase 2).

Meta-modeling as in MetaQNN (Baker et al., ICLR'17), which NPAS follows: a plan is built
layer by layer, so a *state* is (layer position, the previous layer's action) and an
*action* is one of the layer's choices (``search.space.layer_actions``: dense, or a
scheme at a rate). An episode walks every layer once; its reward (accuracy with the
latency penalty) arrives at the end and is backed up along the trajectory::

    agent = QLearningAgent([len(actions) for actions in space.values()], seed=0)
    for step in range(budget):
        agent.epsilon = agent.schedule(step, budget)   # explore first, exploit later
        plan = agent.propose()
        agent.observe(plan, reward(plan))              # also replays past episodes

Why the previous action is in the state: neighbouring layers interact (pruning two
consecutive layers hard costs more accuracy than either alone), and a table over
(position, previous) captures that at no cost. Experience replay re-applies past
episodes after each new one, which makes the table converge with few evaluations
(each is a fine-tune).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

START = -1
"""The 'previous action' of the first layer."""


@dataclass
class EpsilonSchedule:
    """MetaQNN's schedule: pure exploration for ``explore`` of the budget, then epsilon
    falls linearly to ``final``."""

    explore: float = 0.3
    final: float = 0.1

    def __call__(self, step: int, budget: int) -> float:
        start = int(self.explore * budget)
        if step < start:
            return 1.0
        span = max(budget - start - 1, 1)
        return max(self.final, 1.0 - (1.0 - self.final) * (step - start) / span)


@dataclass
class QLearningAgent:
    """Tabular Q-learning over layer-wise choices.

    ``sizes[i]`` is the number of actions of layer ``i``. ``initial`` is the Q value of
    an unseen (state, action), optimistic relative to rewards in [0, 1] so that unseen
    choices get tried under greedy selection too.
    """

    sizes: Sequence[int]
    alpha: float = 0.1
    gamma: float = 1.0
    initial: float = 0.5
    replay: int = 32
    seed: int = 0
    schedule: EpsilonSchedule = field(default_factory=EpsilonSchedule)
    epsilon: float = 1.0
    q: dict = field(default_factory=dict)
    memory: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def value(self, layer: int, previous: int, action: int) -> float:
        return self.q.get((layer, previous, action), self.initial)

    def best_action(self, layer: int, previous: int) -> int:
        values = [self.value(layer, previous, a) for a in range(self.sizes[layer])]
        top = max(values)
        return self._rng.choice([a for a, v in enumerate(values) if v == top])

    def propose(self, epsilon: float | None = None) -> list[int]:
        """One plan (an action index per layer), epsilon-greedy per layer."""
        epsilon = self.epsilon if epsilon is None else epsilon
        choices, previous = [], START
        for layer, size in enumerate(self.sizes):
            if size == 1:
                action = 0
            elif self._rng.random() < epsilon:
                action = self._rng.randrange(size)
            else:
                action = self.best_action(layer, previous)
            choices.append(action)
            previous = action
        return choices

    def learn(self, choices: Sequence[int], reward: float, alpha: float | None = None) -> None:
        """Back the terminal ``reward`` up the episode (last layer first, as MetaQNN)."""
        alpha = self.alpha if alpha is None else alpha
        last = len(choices) - 1
        for layer in range(last, -1, -1):
            previous = choices[layer - 1] if layer else START
            action = choices[layer]
            if layer == last:
                target = reward
            else:
                nxt = layer + 1
                target = self.gamma * max(self.value(nxt, action, a)
                                          for a in range(self.sizes[nxt]))
            key = (layer, previous, action)
            old = self.q.get(key, self.initial)
            self.q[key] = old + alpha * (target - old)

    def observe(self, choices: Sequence[int], reward: float) -> None:
        """Learn from a new episode, remember it, and replay a sample of past ones."""
        self.memory.append((list(choices), float(reward)))
        self.learn(choices, reward)
        for past, past_reward in self.replay_sample():
            self.learn(past, past_reward)

    def replay_sample(self) -> list:
        """Half the replay from the best episodes so far, half uniformly: the table
        averages rewards over the episodes it saw, and replaying the best keeps their
        choices ahead of choices that only did well on average."""
        ranked = sorted(self.memory, key=lambda episode: -episode[1])
        best = ranked[:self.replay // 2]
        rest = ranked[self.replay // 2:]
        return best + self._rng.sample(rest, min(self.replay - len(best), len(rest)))
