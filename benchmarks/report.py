"""Render the README's results section from the suite's JSON (never copied by hand).

    python benchmarks/run.py --json benchmarks/results/results.json \\
        --plots benchmarks/results
    python benchmarks/report.py benchmarks/results/results.json --readme README.md

Replaces what lies between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import render_markdown  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PHONES = ("These are x86 host numbers, measured with the same kernels the ARM target gets "
          "(the emulated ARM device checks correctness; its timings mean nothing). Phone "
          "numbers need a phone: compile for `arm-cpu` and run `npas-tvm bench --rpc-tracker "
          "... --rpc-key ...` against it.")


def kernel_table(folder: str) -> str:
    """Per-layer kernel speed-ups at each rate (1 thread, the steadier figure), from
    ``kernels.json`` (block schemes) and ``kernels_family.json`` (every scheme), then
    the family's goals as ``benchmarks/kernels_family.py`` checks them."""
    rows, family, machines = [], [], []
    for name in ("kernels.json", "kernels_family.json"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("machine"):
            machines.append(f"`{name}` on {data['machine']}")
        for row in data["rows"]:
            if row.get("threads") != 1 or row["rate"] not in (2, 2.25, 3, 5, 10):
                continue
            if name == "kernels_family.json":
                family.append(row)
            scheme = row.get("scheme") or ("block_punched" if row["layer"].startswith("conv3x3")
                                           else "block_based")
            sparse = row.get("sparse_ms", row.get("ms"))
            rows.append((row["layer"], scheme, row["rate"], row["dense_ms"] / sparse,
                         row["ort_ms"] / sparse))
    if not rows:
        return ""
    lines = ["Sparse kernels, 1 thread (`benchmarks/kernels.py`, `benchmarks/kernels_family.py`):"
             " speed-up over TVM's dense kernel / over onnxruntime's dense layer (the first"
             " column is 2.25x for patterns, 2x for the others)."
             + (f" Measured: {'; '.join(machines)}." if machines else ""), "",
             "| layer | scheme | 2x / 2.25x | 3x | 5x | 10x |", "|---|---|---:|---:|---:|---:|"]
    by_key: dict = {}
    for layer, scheme, rate, dense, ort in rows:
        column = 2 if rate in (2, 2.25) else rate
        by_key.setdefault((layer, scheme), {})[column] = f"{dense:.2f} / {ort:.2f}"
    for (layer, scheme), cells in by_key.items():
        lines.append(f"| {layer} | {scheme} | "
                     + " | ".join(cells.get(r, "-") for r in (2, 3, 5, 10)) + " |")
    if family:
        from benchmarks.kernels_family import family_goals

        lines += ["", "Kernel goals, same run:", ""] + [f"- {line}" for line in
                                                       family_goals(family)]
    return "\n".join(lines)


def section(results: dict, plots: list[str], folder: str = "") -> str:
    images = "\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots)
    return "\n\n".join(part for part in (render_markdown(results), kernel_table(folder),
                                          images, PHONES) if part)


def update_readme(readme: str, text: str) -> None:
    with open(readme, encoding="utf-8") as handle:
        content = handle.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w", encoding="utf-8") as handle:
        handle.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the JSON written by benchmarks/run.py --json")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as handle:
        results = json.load(handle)
    folder = os.path.dirname(args.results)
    root = os.path.dirname(os.path.abspath(args.readme))
    plots = [os.path.relpath(os.path.join(folder, name), root)
             for name in ("models.png", "kernels.png", "kernels_family.png")
             if os.path.exists(os.path.join(folder, name))]
    update_readme(args.readme, section(results, plots, folder))
    print(f"updated {args.readme} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
