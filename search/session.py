"""One search run end to end, as ``npas-tvm search`` drives it.

::

    model --> layers --> action space (search.space) --> latency model (search.latency)
      |                                                         |
      +--> torch module + data --> dense training --> AccuracyEvaluator
                                                                |
    strategies (npas, then baselines) --> SearchLog (resumable) --> outputs in OUT/

Outputs in ``OUT``: ``plan.json`` (the best plan, for ``compile --npas``),
``model.pruned.onnx`` (its fine-tuned weights, pruned), ``weights.pt`` (the same as a
torch state dict), ``search_log.jsonl`` (every evaluation; re-running continues it),
``pareto.png`` and ``summary.md``. The dense starting point is trained once and kept in
``OUT/dense.pt``; the latency model is built once per target in ``OUT/latency/`` (or a
shared ``latency_dir``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from npas_tvm.errors import NpasError
from npas_tvm.plan import Plan, save_plan
from search.driver import (
    STRATEGIES, Evaluation, SearchContext, SearchError, SearchLog, best_of, run_strategy,
    space_digest)

MIN_RESOLUTION = 32
"""Accuracy is estimated at a small input size: the smallest multiple of the model's total
stride that is at least this (32x32 for the CIFAR-style VGG and for MobileNetV2, whose
stride is 32), never above the model's own input. The zoo models are fully convolutional
with global pooling, so weights trained small are the weights compiled at the ONNX input
size, and a fine-tune costs (224/32)^2 = 49x less for MobileNetV2. Digits are 8x8 images,
so nothing is lost. The latency model always uses the ONNX model's own input size."""


VERIFY = 5
"""The best plans measured end to end, in order, until one meets the budget."""
FEASIBLE_MARGIN = 1.25
"""The default budget is half the dense model's latency, or this times the fastest plan's
where half is out of reach (MobileNetV2: its depthwise layers stay dense)."""


@dataclass
class SearchConfig:
    model: str                      # a zoo name or an ONNX path
    out: str
    target: str = "host"
    data: str = "digits"
    budget: int = 30                # accuracy evaluations per strategy
    latency_ms: float | None = None  # None: see FEASIBLE_MARGIN
    baselines: Sequence[str] = ()
    method: str = "magnitude"
    epochs: int | None = None        # None: the evaluator's fast settings for the model
    patience: int | None = None
    dense_epochs: int = 15
    final_epochs: int = 10           # whole epochs of the chosen plan's last fine-tune
    resolution: int | None = None
    latency_samples: int | None = None
    latency_dir: str | None = None
    replace_ops: bool = False
    measure: bool = True
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    threads: int | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class SearchOutcome:
    config: SearchConfig
    budget_ms: float
    dense_ms: float
    dense_accuracy: float
    evaluations: dict[str, list[Evaluation]]
    best: Evaluation | None
    final_accuracy: float | None = None
    plan_path: str | None = None
    onnx_path: str | None = None
    measured_ms: float | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    context: SearchContext | None = None

    def best_of(self, source: str) -> Evaluation | None:
        return best_of(self.evaluations.get(source, []))


def _model_files(config: SearchConfig, num_classes: int):
    """(ONNX path for latency and layers, torch module, ONNX name -> torch name)."""
    from search.accuracy import torch_model_for
    from npas_tvm.zoo import ZOO_NAMES, export_onnx, zoo_entry

    module, names = torch_model_for(config.model, num_classes, seed=config.seed)
    if config.model in ZOO_NAMES:
        path = os.path.join(config.out, "model.onnx")
        if not os.path.exists(path):
            export_onnx(module, path, zoo_entry(config.model).input_shape)
        return path, module, names
    return config.model, module, names


def _train_shape(onnx_input: Sequence[int], layers, resolution: int | None
                 ) -> tuple[int, int, int]:
    channels, height, width = (int(d) for d in onnx_input[1:4])
    if resolution is None:
        smallest = min((min(layer.output_spatial) for layer in layers if layer.output_spatial),
                       default=height)
        stride = max(1, height // max(smallest, 1))
        resolution = min(height, stride * max(1, -(-MIN_RESOLUTION // stride)))
    return channels, resolution, resolution


def run_search(config: SearchConfig, say=print) -> SearchOutcome:
    """Run (or continue) the search and write its outputs; ``say`` prints progress lines."""
    import torch

    from npas_tvm.layers import load_model_layers
    from npas_tvm.targets import resolve_target
    from search.accuracy import AccuracyEvaluator, fast_settings
    from search.data import load_dataset
    from search.latency import build_latency_model
    from search.rule_mapper import RuleTarget
    from search.space import plan_from_choices, search_space

    for name in config.baselines:
        if name not in STRATEGIES or name == "npas":
            raise SearchError(f"--baselines: unknown baseline {name!r} (choose from "
                              "rule, random)")
    if config.budget < 1:
        raise SearchError(f"--budget {config.budget}: must be at least 1 evaluation")
    start = time.perf_counter()
    os.makedirs(config.out, exist_ok=True)
    spec = resolve_target(config.target)
    if config.threads:
        torch.set_num_threads(config.threads)

    # The data decides the classifier's width, so it comes first.
    probe_shape, probe_layers = _probe(config.model, config.out)
    train_shape = _train_shape(probe_shape, probe_layers, config.resolution)
    data = load_dataset(config.data, train_shape, seed=config.seed)
    onnx_path, module, weight_names = _model_files(config, data.num_classes)
    if config.replace_ops:
        from search.replace_ops import replace_mobile_unfriendly

        module, replaced = replace_mobile_unfriendly(module)
        say(f"phase 1: replaced {len(replaced)} mobile-unfriendly op(s)"
            + (": " + ", ".join(str(r) for r in replaced[:6]) if replaced else ""))
    # a zoo model's ONNX is exported anew with the data's classifier; a user's is the probe
    layers = probe_layers if onnx_path == config.model else load_model_layers(onnx_path)[1]
    target = RuleTarget.for_spec(spec)
    space = search_space(layers, target)
    searchable = sum(len(actions) > 1 for actions in space.values())
    say(f"{config.model}: {len(layers)} prunable layers, {searchable} searchable; target "
        f"{spec.name}; accuracy on {data.name} at {train_shape[1]}x{train_shape[2]} "
        f"({len(data.y_train)} train / {len(data.y_val)} val)")

    latency_dir = config.latency_dir or os.path.join(config.out, "latency")
    latency_model = build_latency_model(
        onnx_path, config.target, latency_dir, samples=config.latency_samples,
        rpc_tracker=config.rpc_tracker, rpc_key=config.rpc_key, progress=config.progress,
        seed=config.seed)

    def latency(plan: Plan) -> float:  # predict_layer caches each (layer, spec)
        return float(latency_model.predict_plan(layers, plan))

    dense_ms = latency(plan_from_choices(space, [0] * len(space)))
    fastest_ms = latency(plan_from_choices(space, _fastest_choices(space, layers, latency_model)))
    if config.latency_ms:
        budget_ms, why = config.latency_ms, ""
        if budget_ms < fastest_ms:
            say(f"npas-tvm: warning: --latency-ms {budget_ms:g} is below the fastest plan's "
                f"predicted {fastest_ms:.2f} ms: no plan can meet it")
    else:
        budget_ms = max(0.5 * dense_ms, FEASIBLE_MARGIN * fastest_ms)
        why = (" (half the dense model's" if budget_ms == 0.5 * dense_ms else
               f" ({FEASIBLE_MARGIN:g}x the fastest plan's") + "; set --latency-ms)"
    say(f"latency: dense {dense_ms:.2f} ms, fastest plan {fastest_ms:.2f} ms predicted; "
        f"budget {budget_ms:.2f} ms{why}")

    log = SearchLog(os.path.join(config.out, "search_log.jsonl"), {
        "model": os.path.basename(config.model), "target": spec.name,
        "space": space_digest(space), "budget_ms": round(budget_ms, 6), "data": config.data,
        "method": config.method, "seed": config.seed})
    if log.evaluations:
        say(f"continuing {log.path}: {len(log.evaluations)} evaluations already logged")

    settings = fast_settings(config.model)
    if config.epochs is not None:
        settings["epochs"] = config.epochs
    if config.patience is not None:
        settings["patience"] = config.patience
    evaluator = AccuracyEvaluator(module, weight_names, data, method=config.method,
                                  threads=config.threads, progress=config.progress,
                                  seed=config.seed, **settings)
    dense_accuracy = evaluator.train_dense(config.dense_epochs,
                                           checkpoint=os.path.join(config.out, "dense.pt"))
    if "dense" not in log.notes:
        log.note("dense", accuracy=dense_accuracy, latency_ms=dense_ms)
    say(f"dense model: {100 * dense_accuracy:.2f}% validation accuracy")

    context = SearchContext(space, latency, budget_ms, seed=config.seed, layers=layers,
                            target=target, weights=_param_shares(layers))
    weights_path = os.path.join(config.out, "weights.pt")
    plan_path = os.path.join(config.out, "plan.json")

    def keep_best(evaluation: Evaluation, result) -> None:
        incumbent = best_of(log.of("npas"))
        if incumbent is None or (evaluation.reward, -evaluation.latency_ms) > \
                (incumbent.reward, -incumbent.latency_ms):
            torch.save(result.state_dict, weights_path + ".tmp")
            os.replace(weights_path + ".tmp", weights_path)
            _save_plan(context, evaluation, plan_path, budget_ms, config)

    evaluations = {"npas": run_strategy("npas", context, evaluator.evaluate, config.budget,
                                        log, progress=config.progress,
                                        on_evaluated=keep_best)}
    for name in config.baselines:
        evaluations[name] = run_strategy(name, context, evaluator.evaluate, config.budget,
                                         log, progress=config.progress)
    best = best_of(evaluations["npas"])
    chosen, measured = best, None
    if best is not None and config.measure:
        chosen, measured = _verified(config, onnx_path, context, evaluations["npas"], log, say)
    outcome = SearchOutcome(config, budget_ms, dense_ms, dense_accuracy, evaluations, chosen,
                            context=context, measured_ms=measured)
    if chosen is not None:
        _save_plan(context, chosen, plan_path, budget_ms, config)
        outcome.plan_path = plan_path
        if config.final_epochs or chosen is not best:
            outcome.final_accuracy = _final_fine_tune(
                config, context, evaluator, chosen, log, weights_path, say,
                keep_if_better=chosen.accuracy if chosen is best else None)
        state = torch.load(weights_path, weights_only=True)
        outcome.onnx_path = evaluator.export_onnx(
            state, os.path.join(config.out, "model.pruned.onnx"), tuple(probe_shape))
    from search.pareto import plot_pareto
    from search.report import summary_table

    every = [e for group in evaluations.values() for e in group]
    pareto = plot_pareto(every, os.path.join(config.out, "pareto.png"), budget_ms=budget_ms,
                         chosen=chosen, dense=(dense_ms, dense_accuracy),
                         title=f"{os.path.basename(config.model)} on {spec.name}: "
                               f"{len(every)} evaluated plans")
    outcome.seconds = time.perf_counter() - start
    summary = summary_table(outcome)
    with open(os.path.join(config.out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(summary + "\n")
    outcome.files = [p for p in (plan_path, outcome.onnx_path, weights_path, log.path, pareto,
                                 os.path.join(config.out, "summary.md")) if p]
    return outcome


def _fastest_choices(space, layers, latency_model) -> list[int]:
    """Each layer's fastest action by the latency model (layers are independent)."""
    by_name = {layer.name: layer for layer in layers}
    return [min(range(len(actions)),
                key=lambda i: latency_model.predict_layer(by_name[name], actions[i]))
            for name, actions in space.items()]


def _probe(model: str, out: str) -> tuple[tuple[int, ...], list]:
    """The model's input shape and layers before the classifier is sized to the data
    (for the training resolution), from one load."""
    from npas_tvm.layers import load_model_layers
    from npas_tvm.zoo import ZOO_NAMES, export_zoo_model

    path = model
    if model in ZOO_NAMES:
        path = os.path.join(out, f"{model}.probe.onnx")
        if not os.path.exists(path):
            export_zoo_model(model, path)
    loaded, layers = load_model_layers(path)
    shape = next(iter(loaded.input_shapes.values()))
    if len(shape) != 4:
        raise NpasError(f"{model}: the search takes image models (an NCHW input); the "
                        f"first input has shape {tuple(shape)}")
    return tuple(int(d) for d in shape), layers


def _param_shares(layers) -> dict[str, float]:
    total = sum(layer.params for layer in layers) or 1
    return {layer.name: layer.params / total for layer in layers}


def _save_plan(context: SearchContext, evaluation: Evaluation, path: str, budget_ms: float,
               config: SearchConfig) -> None:
    plan = context.plan(evaluation.choices, "search")
    plan.meta.update({"source": "search", "strategy": evaluation.source,
                      "accuracy": round(evaluation.accuracy, 5),
                      "predicted_ms": round(evaluation.latency_ms, 4),
                      "budget_ms": round(budget_ms, 4), "target": config.target,
                      "data": config.data, "method": config.method})
    save_plan(plan, path)


def _final_fine_tune(config: SearchConfig, context: SearchContext, evaluator,
                     chosen: Evaluation, log: SearchLog, weights_path: str, say, *,
                     keep_if_better: float | None = None) -> float:
    """The chosen plan fine-tuned longer (whole epochs) from the dense model: the search
    ranks plans by a short fine-tune, the delivered weights deserve a full one. With
    ``keep_if_better`` (the accuracy of the weights already in ``weights.pt``), those
    are kept when the longer fine-tune does no better. Kept in the log, so a re-run
    does not repeat it; returns the delivered weights' accuracy."""
    import torch

    epochs = config.final_epochs or None
    key = f"final:{','.join(map(str, chosen.choices))}:{config.final_epochs}"
    if key not in log.notes:
        say(f"final fine-tune of the chosen plan"
            + (f": {epochs} epochs" if epochs else ""))
        result = evaluator.evaluate(context.plan(chosen.choices, "search"), epochs=epochs,
                                    **({"steps_per_epoch": 0} if epochs else {}))
        kept = keep_if_better is not None and result.accuracy <= keep_if_better
        if not kept:
            torch.save(result.state_dict, weights_path + ".tmp")
            os.replace(weights_path + ".tmp", weights_path)
        log.note(key, accuracy=float(result.accuracy), epochs=int(result.epochs),
                 delivered=float(keep_if_better if kept else result.accuracy))
        if kept:
            say(f"the longer fine-tune reached {100 * result.accuracy:.2f}%, no better than "
                f"the search's {100 * keep_if_better:.2f}%: its weights are kept")
    note = log.notes[key]
    return float(note.get("delivered", note["accuracy"]))


def _verified(config: SearchConfig, onnx_path: str, context: SearchContext,
              evaluations: list[Evaluation], log: SearchLog, say
              ) -> tuple[Evaluation, float]:
    """The best plan whose *measured* latency meets the budget.

    The latency model steers the search, but its error (a few percent) can put a plan
    predicted just under the budget just over it. The best plans by reward are built
    and timed end to end in order, up to ``VERIFY``; the first within the budget is
    chosen (else the best, reported as over)."""
    ranked = sorted(evaluations, key=lambda e: (e.reward, -e.latency_ms), reverse=True)
    ranked = [e for e in ranked if e.meets][:VERIFY] or ranked[:1]
    for rank, evaluation in enumerate(ranked, 1):
        measured = _measured(config, onnx_path, context, evaluation, log)
        if measured <= context.budget_ms:
            return evaluation, measured
        say(f"plan {rank} ({100 * evaluation.accuracy:.2f}%): measured {measured:.2f} ms, "
            f"over the {context.budget_ms:.2f} ms budget"
            + ("; trying the next" if rank < len(ranked) else ""))
    return ranked[0], _measured(config, onnx_path, context, ranked[0], log)


def _measured(config: SearchConfig, onnx_path: str, context: SearchContext,
              best: Evaluation, log: SearchLog) -> float:
    """The chosen plan's end-to-end latency, measured once (kept in the log)."""
    from search.latency import measure_plan_ms

    key = f"measured:{','.join(map(str, best.choices))}"
    if key not in log.notes:
        value = measure_plan_ms(onnx_path, context.plan(best.choices, "search"), config.target,
                                rpc_tracker=config.rpc_tracker, rpc_key=config.rpc_key)
        log.note(key, latency_ms=float(value))
    return float(log.notes[key]["latency_ms"])
