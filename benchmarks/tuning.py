"""Tuned vs untuned schedules on this machine: one sparse layer, one dense layer, and
(optionally) MobileNetV2 end to end against onnxruntime.

    TVM_NUM_THREADS=2 nice -n 19 python benchmarks/tuning.py --trials 24
    python benchmarks/tuning.py --budget-minutes 10 --model    # + MobileNetV2

The layer is a 3x3 conv 128->128 @28x28: once block-punched at 5x with blocks of
(SIMD lanes) filters x 4 channels (the sparse gathered-tap kernel), once dense (the
blocked conv kernel). Each is tuned with ``npas_tvm.tuning.tune`` (the knob space of
its template, XGBoost-ranked, measured by meta_schedule's LocalRunner), then built
with and without the records and timed interleaved (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _time_builds(model, spec, tuning_db, rounds: int, with_ort: bool = False,
                 npas: str | None = None, reference_model=None):
    """Medians (ms) of the untuned build, the tuned build and (``with_ort``) onnxruntime
    (on ``reference_model``, the pruned ONNX when ``npas`` prunes)."""
    from npas_tvm.compiler import build
    from npas_tvm.runtime import TVMRunner, compare, ort_session, time_interleaved
    from npas_tvm.tuning import prepare_module

    mod = prepare_module(model, spec, npas)
    runners = {"untuned": TVMRunner(build(mod, spec), list(model.input_shapes)),
               "tuned": TVMRunner(build(mod, spec, tuning_db=tuning_db),
                                  list(model.input_shapes))}
    inputs = model.random_inputs()
    session = ort_session((reference_model or model).proto)
    reference = session.run(None, inputs)
    for name, runner in runners.items():
        check = compare(runner.run(inputs), reference)
        if not check.ok:
            print(f"  {name}: numerics MISMATCH {check}", file=sys.stderr)
    engines = {}
    for name, runner in runners.items():
        tensors = runner.tensors(inputs)
        engines[name] = (lambda r, t: lambda: r.vm["main"](*t))(runner, tensors)
    if with_ort:
        engines["onnxruntime"] = lambda: session.run(None, inputs)
    timings = time_interleaved(engines, rounds=rounds, budget_s=120.0)
    return {name: timing.median_ms for name, timing in timings.items()}


def tune_and_compare(name: str, model, spec, trials: int, work_dir: str, rounds: int,
                     budget_s: float | None = None, with_ort: bool = False,
                     npas: str | None = None, reference_model=None) -> dict:
    from npas_tvm.tuning import TuningDatabase, extract_tasks, prepare_module, tune

    start = time.perf_counter()
    tasks = extract_tasks(prepare_module(model, spec, npas), spec)
    report = tune(tasks, spec, work_dir, trials, progress=False, log=lambda _: None,
                  time_budget_s=budget_s)
    tune_s = time.perf_counter() - start
    database = TuningDatabase(work_dir, spec)
    medians = _time_builds(model, spec, database, rounds, with_ort, npas, reference_model)
    row = {"name": name, "tasks": len(tasks), "measured": report.measured + report.reused,
           "tune_s": round(tune_s, 1), "applied": database.applied, **medians,
           "speedup": medians["untuned"] / medians["tuned"], "stopped": report.stopped}
    line = (f"{name}: {len(tasks)} tasks, {row['measured']} measured in {tune_s:.0f} s; "
            f"untuned {medians['untuned']:.3f} ms, tuned {medians['tuned']:.3f} ms "
            f"({row['speedup']:.2f}x)")
    if with_ort:
        line += (f"; onnxruntime {medians['onnxruntime']:.3f} ms (tuned / ort "
                 f"{medians['tuned'] / medians['onnxruntime']:.2f}x)")
    print(line + (f" [{report.stopped}]" if report.stopped else ""), flush=True)
    return row


def _layer(folder: str, spec, sparse: bool):
    from dense import conv_onnx

    from npas_tvm.model_io import load_onnx

    proto = conv_onnx(128, 128, 28, 3, 1, 1)
    path = os.path.join(folder, "conv.onnx")
    import onnx

    onnx.save(proto, path)
    model = load_onnx(path)
    if not sparse:
        return model
    from npas_tvm.sparse_compile import write_pruned_onnx
    from npas_tvm.tuning import prepare_module
    from relay_passes.weights import attached_params

    plan = {"format": "npas-plan", "version": 1,
            "layers": {"w": {"scheme": "block_punched", "rate": 5.0,
                             "block": [spec.simd_lanes, 4]}},
            "default": {"scheme": "dense"}}
    plan_path = os.path.join(folder, "plan.json")
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(plan, f)
    pruned = attached_params(prepare_module(model, spec, plan_path)["main"])
    reference = write_pruned_onnx(model, {"w": pruned["w"]},
                                  os.path.join(folder, "conv.pruned.onnx"))
    return model, plan_path, reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24, help="trials per layer")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timed rounds")
    parser.add_argument("--model", action="store_true", help="also MobileNetV2 end to end")
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="MobileNetV2's tuning time budget")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

    from npas_tvm.targets import resolve_target

    spec = resolve_target("host")
    print(f"host {spec.description}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sparse_dir, dense_dir = os.path.join(folder, "sparse"), os.path.join(folder, "dense")
        os.makedirs(sparse_dir)
        os.makedirs(dense_dir)
        model, plan, reference = _layer(sparse_dir, spec, sparse=True)
        rows.append(tune_and_compare(
            f"sparse conv3x3 128->128 @28 block-punched 5x ({spec.simd_lanes},4)",
            model, spec, args.trials, os.path.join(sparse_dir, "db"), args.rounds,
            npas=plan, reference_model=reference))
        rows.append(tune_and_compare("dense conv3x3 128->128 @28", _layer(dense_dir, spec, False),
                                     spec, args.trials, os.path.join(dense_dir, "db"),
                                     args.rounds))
        if args.model:
            from npas_tvm.model_io import load_onnx
            from npas_tvm.zoo import export_zoo_model

            path = export_zoo_model("mobilenet_v2", os.path.join(folder, "mbv2.onnx"))
            rows.append(tune_and_compare(
                "mobilenet_v2", load_onnx(path), spec, 10**6, os.path.join(folder, "mbv2-db"),
                args.rounds, budget_s=args.budget_minutes * 60, with_ort=True))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
