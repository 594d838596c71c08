"""Latency vs accuracy of every evaluated plan: the Pareto front and its plot."""

from __future__ import annotations

from typing import Sequence

from search.driver import Evaluation

COLORS = {"npas": "tab:blue", "random": "tab:orange", "rule": "tab:green"}


def pareto_front(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """The plans no other plan beats on both latency (lower) and accuracy (higher),
    fastest first."""
    front, best_accuracy = [], -1.0
    for e in sorted(evaluations, key=lambda e: (e.latency_ms, -e.accuracy)):
        if e.accuracy > best_accuracy:
            front.append(e)
            best_accuracy = e.accuracy
    return front


def plot_pareto(evaluations: Sequence[Evaluation], path: str, *, budget_ms: float,
                chosen: Evaluation | None = None, dense: tuple[float, float] | None = None,
                title: str = "") -> str:
    """Scatter every evaluated plan by strategy, the front, the budget line, the chosen
    plan (a star) and the dense model (a cross), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for source in sorted({e.source for e in evaluations}):
        points = [e for e in evaluations if e.source == source]
        ax.scatter([e.latency_ms for e in points], [100 * e.accuracy for e in points],
                   s=18, alpha=0.75, color=COLORS.get(source), label=f"{source} ({len(points)})")
    front = pareto_front(evaluations)
    if front:
        ax.step([e.latency_ms for e in front], [100 * e.accuracy for e in front],
                where="post", color="0.4", linewidth=1, label="Pareto front")
    ax.axvline(budget_ms, color="tab:red", linestyle="--", linewidth=1,
               label=f"budget {budget_ms:.2f} ms")
    if dense is not None:
        ax.scatter([dense[0]], [100 * dense[1]], marker="x", s=60, color="black",
                   label="dense")
    if chosen is not None:
        ax.scatter([chosen.latency_ms], [100 * chosen.accuracy], marker="*", s=220,
                   color="gold", edgecolor="black", zorder=5, label="chosen plan")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("validation accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
