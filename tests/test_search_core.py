"""The search's pieces without training: GP + EI, the Q-learning agent, the strategies,
the resumable log and the Pareto front, on real action spaces with synthetic objectives."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npas_tvm.layers import load_model_layers
from search.bayes import GaussianProcess, expected_improvement
from search.driver import (
    STRATEGIES, Evaluation, SearchContext, SearchError, SearchLog, best_of, reward,
    rule_candidates, run_strategy, space_digest)
from search.pareto import pareto_front, plot_pareto
from search.qlearning import EpsilonSchedule, QLearningAgent
from search.rule_mapper import RuleTarget
from search.space import choices_of_plan, layer_actions, plan_from_choices, search_space

TARGET = RuleTarget(lanes=16)


# -- Gaussian process and expected improvement --------------------------------------------

def test_gp_interpolates_what_it_saw_and_is_unsure_far_away():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(25, 4))
    y = np.sin(3 * x[:, 0]) + x[:, 1]
    gp = GaussianProcess(noise=1e-4).fit(x, y)
    mean, std = gp.predict(x)
    assert np.max(np.abs(mean - y)) < 0.05
    _, far_std = gp.predict(x + 10.0)
    assert far_std.min() > 5 * std.max()


@given(st.lists(st.floats(-1, 1), min_size=3, max_size=3),
       st.floats(0.01, 1), st.floats(-1, 1))
def test_expected_improvement_is_nonnegative_and_grows_with_the_mean(means, std, best):
    means = np.sort(np.asarray(means))
    gain = expected_improvement(means, np.full(3, std), best)
    assert (gain >= 0).all()
    assert (np.diff(gain) >= -1e-12).all()


def test_expected_improvement_without_uncertainty_is_the_plain_gain():
    gain = expected_improvement(np.array([0.2, 0.9]), np.zeros(2), 0.5)
    assert gain.tolist() == pytest.approx([0.0, 0.4])


# -- Q-learning ---------------------------------------------------------------------------

def test_epsilon_schedule_explores_then_decays_to_its_floor():
    schedule = EpsilonSchedule(explore=0.3, final=0.1)
    values = [schedule(step, 20) for step in range(20)]
    assert values[:6] == [1.0] * 6
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.1)


def test_agent_learns_a_separable_plan():
    target = [2, 0, 1]
    agent = QLearningAgent([3, 3, 3], seed=0)
    for step in range(300):
        agent.epsilon = agent.schedule(step, 300)
        choices = agent.propose()
        agent.observe(choices, sum(c == t for c, t in zip(choices, target)) / 3)
    assert agent.propose(epsilon=0.0) == target


def test_single_action_layers_stay_put():
    agent = QLearningAgent([1, 4, 1], seed=3)
    for _ in range(20):
        choices = agent.propose(epsilon=1.0)
        assert choices[0] == 0 and choices[2] == 0


# -- the action space ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mbv2_layers(zoo_onnx):
    return load_model_layers(zoo_onnx("mobilenet_v2"))[1]


def test_space_keeps_dense_first_and_depthwise_dense_only(mbv2_layers):
    space = search_space(mbv2_layers, TARGET)
    for layer in mbv2_layers:
        actions = space[layer.name]
        assert actions[0].scheme == "dense"
        if layer.kind == "depthwise":
            assert len(actions) == 1
        assert len({json.dumps(a.to_json(), sort_keys=True) for a in actions}) == len(actions)
    searchable = [name for name, actions in space.items() if len(actions) > 1]
    assert len(searchable) >= 30


def test_plan_and_choices_round_trip(mbv2_layers):
    space = search_space(mbv2_layers, TARGET)
    rng = random.Random(0)
    choices = [rng.randrange(len(a)) for a in space.values()]
    assert choices_of_plan(space, plan_from_choices(space, choices)) == choices


def test_patterns_only_where_the_target_has_a_pattern_kernel(zoo_onnx):
    _, layers = load_model_layers(zoo_onnx("vgg_cifar"))
    conv3x3 = next(layer for layer in layers if layer.weight_shape[2:] == (3, 3))
    with_patterns = {a.scheme for a in layer_actions(conv3x3, TARGET)}
    without = {a.scheme for a in layer_actions(
        conv3x3, RuleTarget(lanes=16, has_kernel=lambda s: s != "pattern"))}
    assert "pattern" in with_patterns and "pattern" not in without
    assert "block_punched" in without


# -- the strategies on a synthetic objective ----------------------------------------------

def _synthetic(layers, space):
    """Latency ~ MACs / rate (sparse kernels 30% less efficient); accuracy loses
    log2(rate)^2 weighted by a per-layer sensitivity and the layer's size."""
    by_name = {layer.name: layer for layer in layers}
    sensitivity = {layer.name: random.Random(layer.name).uniform(0.2, 2.0) for layer in layers}
    total = sum(layer.params for layer in layers)

    def latency(plan):
        return 0.5 + sum(by_name[n].macs / 1e8 / (getattr(s, "rate", 1.0) or 1.0)
                         * (1.0 if s.scheme == "dense" else 1.3)
                         for n, s in plan.layers.items())

    def evaluate(plan):
        accuracy = 0.99
        for name, spec in plan.layers.items():
            rate = getattr(spec, "rate", 1.0) or 1.0
            accuracy -= (sensitivity[name] * 0.01 * math.sqrt(by_name[name].params / total)
                         * math.log2(rate) ** 2 * (0.6 if spec.scheme == "pattern" else 1.0))
        return SimpleNamespace(accuracy=accuracy, epochs=1)

    return latency, evaluate


def _context(layers, space, latency, seed=0):
    dense = latency(plan_from_choices(space, [0] * len(space)))
    total = sum(layer.params for layer in layers)
    return SearchContext(space, latency, 0.5 * dense, seed=seed, layers=layers, target=TARGET,
                         weights={layer.name: layer.params / total for layer in layers})


def _log(tmp_path, name, space, budget_ms):
    return SearchLog(str(tmp_path / f"{name}.jsonl"),
                     {"model": "m", "target": "host", "space": space_digest(space),
                      "budget_ms": budget_ms, "data": "synthetic"})


def test_search_beats_random_and_rule_on_a_synthetic_objective(mbv2_layers, tmp_path):
    space = search_space(mbv2_layers, TARGET)
    latency, evaluate = _synthetic(mbv2_layers, space)
    best = {name: [] for name in STRATEGIES}
    for seed in range(2):
        context = _context(mbv2_layers, space, latency, seed)
        for name in STRATEGIES:
            log = _log(tmp_path, f"{name}{seed}", space, context.budget_ms)
            done = run_strategy(name, context, evaluate, 24, log, progress=False)
            assert all(e.source == name for e in done)
            best[name].append(best_of(done).reward)
    assert np.mean(best["npas"]) > np.mean(best["random"]) > 0
    assert np.mean(best["npas"]) > np.mean(best["rule"])


def test_random_baseline_stays_within_the_predicted_budget(mbv2_layers, tmp_path):
    space = search_space(mbv2_layers, TARGET)
    latency, evaluate = _synthetic(mbv2_layers, space)
    context = _context(mbv2_layers, space, latency)
    done = run_strategy("random", context, evaluate, 6, _log(tmp_path, "r", space,
                                                            context.budget_ms), progress=False)
    assert all(e.latency_ms <= context.budget_ms and e.meets for e in done)


def test_rule_candidates_start_with_the_lightest_plan_within_budget(mbv2_layers):
    space = search_space(mbv2_layers, TARGET)
    latency, _ = _synthetic(mbv2_layers, space)
    context = _context(mbv2_layers, space, latency)
    candidates = rule_candidates(context)
    times = [context.predicted(c) for c in candidates]
    within = [t for t in times if t <= context.budget_ms]
    assert within and times[0] == max(within)


def test_reward_penalizes_only_what_is_over_budget():
    assert reward(0.9, 1.0, 2.0) == 0.9
    assert reward(0.9, 2.2, 2.0) == pytest.approx(0.9 - 0.2)


# -- the resumable log --------------------------------------------------------------------

def test_rerun_continues_the_log_without_repeating_evaluations(mbv2_layers, tmp_path):
    space = search_space(mbv2_layers, TARGET)
    latency, evaluate = _synthetic(mbv2_layers, space)
    calls = []

    def counted(plan):
        calls.append(plan)
        return evaluate(plan)

    context = _context(mbv2_layers, space, latency)
    first = run_strategy("npas", context, counted, 4, _log(tmp_path, "s", space,
                                                          context.budget_ms), progress=False)
    with open(tmp_path / "s.jsonl", "a") as handle:
        handle.write('{"kind": "eval", "source": "np')          # killed mid-write
    log = _log(tmp_path, "s", space, context.budget_ms)
    assert [e.choices for e in log.evaluations] == [e.choices for e in first]
    again = run_strategy("npas", context, counted, 6, log, progress=False)
    assert len(calls) == 6 and len(again) == 6
    assert [e.choices for e in again[:4]] == [e.choices for e in first]


def test_a_log_of_another_search_is_refused_in_one_line(mbv2_layers, tmp_path):
    space = search_space(mbv2_layers, TARGET)
    _log(tmp_path, "x", space, 1.0)
    with pytest.raises(SearchError, match=r"x\.jsonl: a log of another search \(budget_ms"):
        _log(tmp_path, "x", space, 2.0)


# -- Pareto front -------------------------------------------------------------------------

def _evaluation(latency, accuracy, source="npas"):
    return Evaluation(source=source, step=0, choices=[], accuracy=accuracy,
                      latency_ms=latency, reward=accuracy, seconds=0.0)


@given(st.lists(st.tuples(st.floats(0.1, 10), st.floats(0, 1)), min_size=1, max_size=30))
def test_pareto_front_is_exactly_the_undominated_plans(points):
    evaluations = [_evaluation(lat, acc) for lat, acc in points]
    front = pareto_front(evaluations)
    for e in evaluations:
        dominated = any(o.latency_ms <= e.latency_ms and o.accuracy >= e.accuracy and
                        (o.latency_ms, o.accuracy) != (e.latency_ms, e.accuracy)
                        for o in evaluations)
        on_front = any((f.latency_ms, f.accuracy) == (e.latency_ms, e.accuracy) for f in front)
        assert on_front != dominated or not on_front
        if not dominated:
            assert on_front
    assert all(a.latency_ms <= b.latency_ms and a.accuracy < b.accuracy
               for a, b in zip(front, front[1:]))


def test_pareto_plot_is_a_png(tmp_path):
    evaluations = [_evaluation(1 + i / 3, 0.9 + i / 100, source)
                   for i, source in enumerate(["npas", "random", "rule"] * 3)]
    path = plot_pareto(evaluations, str(tmp_path / "p.png"), budget_ms=2.0,
                       chosen=evaluations[2], dense=(4.0, 0.99))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
