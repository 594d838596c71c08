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


def section(results: dict, plots: list[str]) -> str:
    images = "\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots)
    return "\n\n".join(part for part in (render_markdown(results), images, PHONES) if part)


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
             for name in ("models.png", "kernels.png")
             if os.path.exists(os.path.join(folder, name))]
    update_readme(args.readme, section(results, plots))
    print(f"updated {args.readme} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
