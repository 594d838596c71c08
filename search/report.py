"""The search's summary table: the chosen plan against the dense model and the baselines."""

from __future__ import annotations

from search.driver import Evaluation


def plan_rate(context, evaluation: Evaluation) -> float:
    """Weights of the searchable layers / weights kept (the plan's compression)."""
    by_name = {layer.name: layer for layer in context.layers}
    total = kept = 0.0
    for (name, actions), index in zip(context.space.items(), evaluation.choices):
        params = by_name[name].params
        total += params
        kept += params / float(getattr(actions[index], "rate", 1.0) or 1.0)
    return total / kept if kept else 1.0


def summary_table(outcome) -> str:
    """A markdown table: one row per strategy's best plan, and the dense model."""
    dense = outcome.dense_accuracy
    lines = [f"Search: {outcome.config.model} on {outcome.config.target}, data "
             f"{outcome.config.data}, budget {outcome.budget_ms:.2f} ms predicted "
             f"(dense {outcome.dense_ms:.2f} ms), {outcome.config.budget} evaluations per "
             f"strategy ({outcome.seconds / 60:.1f} min in this run)",
             "",
             "| plan | evaluations (min) | accuracy | vs dense (points) | predicted ms "
             "| meets budget | weights rate |",
             "|---|---:|---:|---:|---:|---|---:|",
             f"| dense | - | {100 * dense:.2f}% | 0.00 | {outcome.dense_ms:.2f} | "
             f"{'yes' if outcome.dense_ms <= outcome.budget_ms else 'no'} | 1.00x |"]
    for source, evaluations in outcome.evaluations.items():
        best = outcome.best_of(source)
        if best is None:
            continue
        label = "search (npas)" if source == "npas" else f"{source} baseline"
        lines.append(
            f"| {label} | {len(evaluations)} "
            f"({sum(e.seconds for e in evaluations) / 60:.1f}) | {100 * best.accuracy:.2f}% | "
            f"{100 * (best.accuracy - dense):+.2f} | {best.latency_ms:.2f} | "
            f"{'yes' if best.meets else 'no'} | {plan_rate(outcome.context, best):.2f}x |")
    chosen = outcome.best
    if chosen is not None:
        accuracy = outcome.final_accuracy if outcome.final_accuracy is not None \
            else chosen.accuracy
        meets = chosen.meets if outcome.measured_ms is None \
            else outcome.measured_ms <= outcome.budget_ms
        lines.append(
            f"| chosen plan, delivered weights | - | {100 * accuracy:.2f}% | "
            f"{100 * (accuracy - dense):+.2f} | {chosen.latency_ms:.2f} | "
            f"{'yes' if meets else 'no'}{' (measured)' if outcome.measured_ms else ''} | "
            f"{plan_rate(outcome.context, chosen):.2f}x |")
    if outcome.measured_ms is not None and chosen is not None:
        lines += ["", f"Chosen plan measured end to end: {outcome.measured_ms:.2f} ms "
                      f"(predicted {chosen.latency_ms:.2f} ms; budget "
                      f"{outcome.budget_ms:.2f} ms: "
                      f"{'met' if outcome.measured_ms <= outcome.budget_ms else 'missed'})."]
    return "\n".join(lines)
