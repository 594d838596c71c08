"""Accuracy of the search's latency model (search/latency.py) on this machine.

    nice -n 5 python benchmarks/latency_model.py            # vgg_cifar and mobilenet_v2
    python benchmarks/latency_model.py --models vgg_cifar --plans 6

Two questions, per model:

* **Held-out layers**: the layer records are split by layer into folds; a model trained
  on the other layers' records (and the held-out layers' dense records, which every
  build measures) predicts the held-out layers' sparse records (the kernel timed
  alone). Spearman rank correlation and mean relative error (|pred - meas| / meas).
* **Whole-model plans**: random plans drawn from the search space (each with its own
  share of pruned layers, so plans span dense to fully pruned), the rule-based plan at
  3x and uniform plans at 2x and 5x; each predicted (sum of layers + the remainder) and
  measured end to end (pruned, built as ``compile --npas`` builds, median timing).
  Each plan is timed in ``--rounds`` interleaved rounds (median of ``--repeat`` timings
  each) and its fastest round counts. Spearman and mean relative error. The goal: Spearman >= 0.9, the ranking the search
  needs.

Writes ``benchmarks/results/latency_model.json`` (figures, settings and the machine).
Layer records are kept in ``--work-dir`` and reused by a second run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def mre(predicted, measured) -> float:
    predicted, measured = np.asarray(predicted), np.asarray(measured)
    return float(np.mean(np.abs(predicted - measured) / measured))


def held_out_layers(records: list[dict], folds: int = 4, seed: int = 0) -> dict:
    """Train on some layers' records, predict the others' (kernel alone, uncalibrated)."""
    from search.latency import train

    names = sorted({r["layer"] for r in records})
    random.Random(seed).shuffle(names)
    predicted, measured = [], []
    for fold in range(folds):
        test = set(names[fold::folds])
        held = [r["layer"] in test and r["spec"].get("scheme") != "dense" for r in records]
        train_records = [r for r, out in zip(records, held) if not out]
        test_records = [r for r, out in zip(records, held) if out]
        if not test_records or len(train_records) < 2:
            continue
        model = train(train_records, seed)
        predicted += [model.predict_record(r) for r in test_records]
        measured += [r["ms"] for r in test_records]
    return {"records": len(measured), "layers": len(names), "folds": folds,
            "spearman": spearman(predicted, measured), "mre": mre(predicted, measured)}


def random_plans(space, count: int, seed: int):
    from search.space import plan_from_choices

    rng = random.Random(seed)
    plans = []
    for index in range(count):
        share = (index + 0.5) / count  # plans from lightly to fully pruned
        choices = [rng.randrange(1, len(actions)) if len(actions) > 1 and rng.random() < share
                   else 0 for actions in space.values()]
        plans.append((f"random{index}", plan_from_choices(space, choices, "random")))
    return plans


def evaluate_model(name: str, args, work_root: str) -> dict:
    from npas_tvm.layers import load_model_layers
    from npas_tvm.targets import resolve_target
    from npas_tvm.zoo import export_zoo_model
    from search.latency import build_latency_model, measure_plan_ms, read_records
    from search.rule_mapper import RuleTarget, rule_plan, uniform_plan
    from search.space import search_space

    work = os.path.join(work_root, name)
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"{name}.onnx")
    if not os.path.exists(path):
        export_zoo_model(name, path)
    started = time.perf_counter()
    samples = args.samples.get(name)
    model = build_latency_model(path, args.target, work, samples=samples, progress=False)
    build_s = time.perf_counter() - started
    records = [r for r in read_records(os.path.join(work, "latency_records.jsonl")).values()
               if "features" in r]
    held = held_out_layers(records)
    print(f"{name}: built in {build_s:.0f} s from {len(records)} records; held-out layers: "
          f"Spearman {held['spearman']:.3f}, MRE {held['mre']:.3f}", flush=True)
    spec = resolve_target(args.target)
    rule_target = RuleTarget.for_spec(spec)
    _, layers = load_model_layers(path)
    space = search_space(layers, rule_target)
    plans = random_plans(space, args.plans, args.seed)
    plans += [("rule 3x", rule_plan(layers, 3.0, rule_target)),
              ("uniform 2x", uniform_plan(layers, 2.0, rule_target)),
              ("uniform 5x", uniform_plan(layers, 5.0, rule_target))]
    rows = []
    measured_rounds: dict[str, list[float]] = {label: [] for label, _ in plans}
    for _ in range(args.rounds):  # interleaved: a slow spell hits one round of every plan
        for label, plan in plans:
            measured_rounds[label].append(measure_plan_ms(path, plan, args.target,
                                                          repeat=args.repeat))
    for label, plan in plans:
        predicted = model.predict_plan(layers, plan)
        measured = min(measured_rounds[label])
        pruned = sum(plan.spec_for(layer.name).scheme != "dense" for layer in layers)
        rows.append({"plan": label, "pruned_layers": pruned, "predicted_ms": predicted,
                     "measured_ms": measured, "rounds_ms": measured_rounds[label]})
        print(f"  {label:<11} {pruned:>3} pruned  predicted {predicted:8.3f} ms  "
              f"measured {measured:8.3f} ms  ratio {predicted / measured:.2f}", flush=True)
    predicted = [r["predicted_ms"] for r in rows]
    measured = [r["measured_ms"] for r in rows]
    whole = {"plans": len(rows), "spearman": spearman(predicted, measured),
             "mre": mre(predicted, measured)}
    print(f"{name}: whole-model plans: Spearman {whole['spearman']:.3f}, "
          f"MRE {whole['mre']:.3f} ({len(rows)} plans)", flush=True)
    return {"layers": len(layers), "actions": sum(len(a) for a in space.values()),
            "records": len(records), "build_s": build_s, "base_ms": model.base_ms,
            "scale": model.scale, "dense_ms": model.meta.get("dense_ms"),
            "held_out_layers": held, "whole_model": whole, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg_cifar", "mobilenet_v2"])
    parser.add_argument("--target", default="host")
    parser.add_argument("--plans", type=int, default=8, help="random plans per model")
    parser.add_argument("--repeat", type=int, default=10, help="timings per plan")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of every plan; the fastest round's median "
                             "counts (a plan's median was seen 30%% high in one round)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", default=os.path.join("/tmp", "npas-latency-bench"))
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "latency_model.json"))
    args = parser.parse_args(argv)
    args.samples = {"mobilenet_v2": 120}

    from npas_tvm.runtime import ensure_thread_env
    from npas_tvm.targets import detect_host_cpu

    threads = ensure_thread_env()
    cpu = detect_host_cpu()
    print(f"machine: {cpu.describe()}; {os.cpu_count()} CPUs; TVM_NUM_THREADS={threads}; "
          f"target {args.target}; {args.plans} random plans + rule + 2 uniform per model",
          flush=True)
    started = time.perf_counter()
    results = {"machine": {"cpu": cpu.describe(), "cpus": os.cpu_count(),
                           "platform": platform.platform()},
               "settings": {"threads": threads, "target": args.target, "plans": args.plans,
                            "repeat": args.repeat, "rounds": args.rounds, "seed": args.seed,
                            "samples": args.samples},
               "models": {}}
    for name in args.models:
        results["models"][name] = evaluate_model(name, args, args.work_dir)
    results["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"wrote {args.json} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
