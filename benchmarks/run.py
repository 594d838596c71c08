"""The end-to-end benchmark suite: npas-tvm against onnxruntime, MNN, PyTorch and dense TVM.

    TVM_NUM_THREADS=2 python benchmarks/run.py --json results.json --markdown results.md \\
        --plots plots/
    python benchmarks/run.py --quick          # one small model, few rounds (CI)
    npas-tvm bench --suite [--quick]          # the same

For each zoo model, in one run on this machine and with the same thread count for every
engine: onnxruntime (dense model), MNN (dense, and its sparse mode on each pruned
model), PyTorch eager, TVM dense (npas-tvm's untuned default schedules; tuned too with
``--tuning-db``), and npas-tvm at each plan: ``rule`` (the rule-based plan at 3x) and
``uniform2/5/10`` (every layer at that rate, with the best scheme per layer type); with
``--tune-trials N``, TVM dense and npas-tvm's rule plan are also tuned with N trials
each (the same budget) and timed tuned. Every compiled model is checked against
onnxruntime on its own (pruned) ONNX first. Latency is the median of interleaved rounds
after warm-up (engines alternate, the order rotating, each timed call after an untimed
one and a pause until the process is idle); min and max are printed too, and every ratio
is against onnxruntime on the dense model. Results go to JSON (the README's results
section is rendered from it by ``benchmarks/report.py``), a Markdown table and PNG
plots.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import engines  # noqa: E402

PLANS = ("rule", "uniform2", "uniform5", "uniform10")
DEFAULT_MODELS = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "vgg_cifar")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--plans", nargs="+", default=list(PLANS),
                        help="rule, uniform<R> (e.g. uniform5), or plan JSON files")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every engine (default TVM_NUM_THREADS or all CPUs)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per engine")
    parser.add_argument("--work-dir", default="npas-bench", help="models and libraries")
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="also tune TVM dense and npas-tvm's rule plan with this many "
                             "trials each (the same budget) and time the tuned builds")
    parser.add_argument("--no-mnn", action="store_true", help="skip MNN")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--quick", action="store_true",
                        help="vgg_cifar, plans rule and uniform5, 5 rounds (for CI)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--plots", help="write PNG plots into this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.plans, args.rounds = ["vgg_cifar"], ["rule", "uniform5"], 5
    return args


def machine() -> dict:
    from npas_tvm.targets import detect_host_cpu

    return {"cpu": detect_host_cpu().describe(), "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version()}


def plan_file(plan: str, model_path: str, spec, work_dir: str) -> tuple[str, float | None]:
    """(``--npas`` value, rate) for a plan name: ``rule``, ``uniformR`` or a file."""
    if plan == "rule":
        return "rule", 3.0
    if plan.startswith("uniform"):
        from npas_tvm.layers import load_model_layers
        from npas_tvm.plan import save_plan
        from search.rule_mapper import RuleTarget, uniform_plan

        _, layers = load_model_layers(model_path)
        rate = float(plan[len("uniform"):])
        stem = os.path.splitext(os.path.basename(model_path))[0]
        path = os.path.join(work_dir, f"{stem}.{plan}.plan.json")
        save_plan(uniform_plan(layers, rate, RuleTarget.for_spec(spec)), path)
        return path, None
    return plan, None


def prepare_model(name: str, args, spec, threads: int, log) -> dict:
    """Build every engine of one model; returns {engine label: (callable, plan)}."""
    from npas_tvm.compiler import compile_model, export
    from npas_tvm.model_io import load_onnx
    from npas_tvm.runtime import compare, run_onnxruntime
    from npas_tvm.sparse_compile import compile_sparse
    from npas_tvm.zoo import export_zoo_model

    work = os.path.join(args.work_dir, name)
    os.makedirs(work, exist_ok=True)
    onnx_path = export_zoo_model(name, os.path.join(work, f"{name}.onnx"))
    model = load_onnx(onnx_path)
    inputs = model.random_inputs()
    output = model.proto.graph.output[0].name
    names = list(model.input_shapes)
    found: dict = {"onnxruntime": (engines.ort_engine(onnx_path, inputs), "dense")}
    checks: dict = {}

    def check(label, run, reference_proto):
        value = run()
        value = value[0] if isinstance(value, (list, tuple)) else value
        value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        result = compare([value], run_onnxruntime(reference_proto, inputs))
        checks[label] = result.max_rel
        log(f"  {label}: vs onnxruntime {result} ({'OK' if result.ok else 'MISMATCH'})")
        return result.ok

    library = export(compile_model(model, spec), os.path.join(work, "dense.so"), spec)
    found["tvm dense"] = (engines.tvm_engine(library, names, inputs), "dense")
    if args.tune_trials:
        tuned = export(compile_model(model, spec, tuning_db=_tuned(model, spec, None, work,
                                                                   args.tune_trials, log)),
                       os.path.join(work, "dense.tuned.so"), spec)
        found["tvm dense tuned"] = (engines.tvm_engine(tuned, names, inputs), "dense")
    if not args.no_torch:
        found["pytorch eager"] = (engines.torch_engine(name, inputs, threads), "dense")
    use_mnn = not args.no_mnn and engines.mnn_available()
    if use_mnn:
        mnn = engines.mnn_convert(onnx_path, os.path.join(work, "dense.mnn"))
        found["mnn"] = (engines.mnn_engine(mnn, inputs, output, threads), "dense")
    for label, (run, _) in list(found.items()):
        if label != "onnxruntime":
            check(label, run, model.proto)
    for plan in args.plans:
        npas, rate = plan_file(plan, onnx_path, spec, work)
        out = os.path.join(work, f"npas.{os.path.basename(plan).removesuffix('.json')}.so")
        executable, pruned = compile_sparse(model, spec, npas, rate, out, table=False)
        library = export(executable, out, spec)
        label = f"npas-tvm {plan}"
        found[label] = (engines.tvm_engine(library, names, inputs), plan)
        check(label, found[label][0], pruned.proto)
        if args.tune_trials and plan == "rule":
            database = _tuned(model, spec, "rule", work, args.tune_trials, log)
            executable, _ = compile_sparse(model, spec, npas, rate, out, table=False,
                                           tuning_db=database)
            tuned = export(executable, out.replace(".so", ".tuned.so"), spec)
            found[f"{label} tuned"] = (engines.tvm_engine(tuned, names, inputs), plan)
            check(f"{label} tuned", found[f"{label} tuned"][0], pruned.proto)
        if use_mnn:
            mnn = engines.mnn_convert(pruned.path, out.replace(".so", ".mnn"), sparse=True)
            found[f"mnn sparse {plan}"] = (engines.mnn_engine(mnn, inputs, output, threads),
                                           plan)
            check(f"mnn sparse {plan}", found[f"mnn sparse {plan}"][0], pruned.proto)
    return {"engines": found, "checks": checks}


def _tuned(model, spec, npas: str | None, work: str, trials: int, log):
    """Tune the model (dense, or pruned by ``npas``) on this machine; its database."""
    from npas_tvm.tuning import TuningDatabase, extract_tasks, prepare_module, tune

    folder = os.path.join(work, f"tune-{npas or 'dense'}")
    tasks = extract_tasks(prepare_module(model, spec, npas), spec)
    report = tune(tasks, spec, folder, trials, progress=False, log=lambda line: None)
    log(f"  tuned {npas or 'dense'}: {len(tasks)} kernels, {report.measured} measured, "
        f"{report.reused} reused")
    return TuningDatabase(folder, spec)


def run_suite(args, log=print) -> dict:
    from npas_tvm.runtime import default_threads, time_interleaved
    from npas_tvm.targets import resolve_target

    threads = args.threads or default_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    spec = resolve_target("host")
    results = {"machine": machine(), "threads": threads, "rounds": args.rounds,
               "date": time.strftime("%Y-%m-%d"), "models": {}}
    log(f"machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs; "
        f"{threads} threads for every engine; medians of {args.rounds} interleaved rounds")
    for name in args.models:
        log(f"{name}: building")
        built = prepare_model(name, args, spec, threads, log)
        timings = time_interleaved({label: run for label, (run, _) in built["engines"].items()},
                                   rounds=args.rounds, budget_s=None)
        base = timings["onnxruntime"].median_ms
        rows = []
        for label, (_, plan) in built["engines"].items():
            t = timings[label]
            rows.append({"engine": label, "plan": plan, "median_ms": t.median_ms,
                         "min_ms": t.min_ms, "max_ms": t.max_ms, "rounds": t.rounds,
                         "vs_onnxruntime": base / t.median_ms,
                         "max_rel_err": built["checks"].get(label, 0.0)})
        results["models"][name] = rows
        log(render_model_table(name, rows))
    return results


def render_model_table(name: str, rows: list[dict]) -> str:
    lines = [f"**{name}**", "",
             "| engine | plan | median ms | min-max ms | speed vs onnxruntime |",
             "|---|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: r["median_ms"]):
        lines.append(f"| {row['engine']} | {row['plan']} | {row['median_ms']:.2f} | "
                     f"{row['min_ms']:.2f}-{row['max_ms']:.2f} | "
                     f"{row['vs_onnxruntime']:.2f}x |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    head = (f"Measured on {results['machine']['cpu']} ({results['machine']['cpus']} CPUs, "
            f"{results['machine']['system']}), {results['threads']} threads for every "
            f"engine, medians of {results['rounds']} interleaved rounds, {results['date']}. "
            "Speed vs onnxruntime > 1 means faster than onnxruntime on the dense model.")
    return "\n\n".join([head, *(render_model_table(name, rows)
                                for name, rows in results["models"].items())])


def plot(results: dict, folder: str, kernel_jsons: tuple[str, ...] = ()) -> list[str]:
    """Per-model bars by engine; latency vs rate per scheme if a kernels JSON exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, name in zip(axes[0], models):
        rows = sorted(results["models"][name], key=lambda r: r["median_ms"])
        axis.barh([r["engine"] for r in rows], [r["median_ms"] for r in rows],
                  xerr=[[r["median_ms"] - r["min_ms"] for r in rows],
                        [r["max_ms"] - r["median_ms"] for r in rows]], color="tab:blue")
        axis.set_title(name)
        axis.set_xlabel("latency (ms, median; bars: min-max)")
        axis.invert_yaxis()
    fig.tight_layout()
    path = os.path.join(folder, "models.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    found = [path for path in kernel_jsons if os.path.exists(path)]
    if found:
        written.append(plot_kernels(found, folder))
    return written


def plot_kernels(kernel_jsons: list[str], folder: str) -> str:
    """Speed-up over the dense TVM kernel vs rate: one panel per layer type, one line per
    layer and scheme, from ``benchmarks/kernels.py`` / ``kernels_family.py`` JSON (their
    1-thread rows, the steadier figures)."""
    import json

    import matplotlib.pyplot as plt

    series: dict = {}
    for path in kernel_jsons:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        rows = data["rows"] if isinstance(data, dict) else data
        threads = min(row.get("threads", 1) for row in rows)
        for row in rows:
            if row.get("threads", 1) != threads:
                continue
            sparse = row.get("sparse_ms", row.get("ms"))
            kind = row["layer"].split()[0]
            scheme = row.get("scheme") or ("block_punched" if kind == "conv3x3" else
                                           "block_based")
            key = (kind, f"{row['layer']}: {scheme}")
            series.setdefault(key, {})[row["rate"]] = row["dense_ms"] / sparse
    kinds = sorted({kind for kind, _ in series})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for (group, label), points in sorted(series.items()):
            if group != kind:
                continue
            rates = sorted(points)
            axis.plot(rates, [points[r] for r in rates], marker="o", label=label)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{kind}: speed-up over the dense TVM kernel (1 thread)")
        axis.set_xlabel("pruning rate (x)")
        axis.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, "kernels.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_suite(args)
    if args.json:
        engines.write_json(args.json, results)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(render_markdown(results) + "\n")
    if args.plots:
        here = os.path.dirname(args.json or os.path.join(args.plots, "x"))
        kernel_jsons = tuple(os.path.join(here, name)
                             for name in ("kernels.json", "kernels_family.json"))
        for path in plot(results, args.plots, kernel_jsons):
            print(f"wrote {path}")
    bad = [(name, row["engine"]) for name, rows in results["models"].items() for row in rows
           if row["max_rel_err"] > 1e-4]
    if bad:
        print(f"MISMATCH against onnxruntime: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
