"""Phase 2.3's report: the summary of every agent's points, the console tables, the figures.

``summarise`` turns the checkpointed item results into one JSON-ready summary: per agent its
map (held-out R², cosines per layer) and per point the headline scores, with the gap closure
``G`` where the agent has a tuned model; and the homophily spread across agents unsteered vs
steered at ``homophily_lambda``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from mahals import plots
from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.evaluation import gap_closure
from mahals.pipelines.common import results_under
from mahals.pipelines.console import WIDE_RULE, banner, table
from mahals.pipelines.phase23_target import Agent
from mahals.transfer import homophily, homophily_plot

if TYPE_CHECKING:
    from mahals.pipelines.phase23 import Phase23Config

__all__ = ["log_tables", "save_figures", "summarise"]

log = logging.getLogger(__name__)

HOMOPHILY_METRICS = {"AQI (last layer)": "aqi_last", "refusal (unsafe)": "refusal_unsafe",
                     "over-refusal (safe)": "over_refusal_safe", "margin (nats)": "margin"}  # fmt: skip


def _point_row(
    result: Mapping[str, Any], none: Mapping[str, Any] | None, tuned: Mapping[str, Any] | None
) -> dict[str, Any]:
    margin = result["margin"]["mean"]
    closure = (gap_closure(margin, none["margin"]["mean"], tuned["margin"]["mean"])
               if none is not None and tuned is not None else None)  # fmt: skip
    curve = result["aqi"]["mahalanobis"]
    return {
        "vector": "none" if result["lambda"] == 0 and result["side"] == "base" else (
            "tuned" if result["side"] == "tuned" else result["vector"]),
        "lambda": result["lambda"], "margin": margin, "margin_ci": [result["margin"]["ci_low"], result["margin"]["ci_high"]],
        "accuracy": result["accuracy"], "gap_closure": closure,
        "refusal_unsafe": result["refusal_unsafe"], "over_refusal_safe": result["over_refusal_safe"],
        "kl": result["kl_tuned_steered"]["mean"], "perplexity_neutral": result["perplexity_neutral"],
        "aqi_last": curve[-1], "aqi_mean": result["aqi"]["mahalanobis_mean"], "aqi_per_layer": curve,
    }  # fmt: skip


def summarise(
    config: Phase23Config,
    agents_by_key: Mapping[str, Agent],
    results: Mapping[str, dict[str, Any]],
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """The run's summary: ``data`` (evaluation and map rows) and, per agent, its map and its
    points' headline scores; the homophily spread once every agent has both of its points."""
    agents: dict[str, Any] = {}
    for key, agent in agents_by_key.items():
        mine = results_under(results, key)
        none, tuned = mine.get("none"), mine.get("tuned")
        agents[key] = {
            "role": "source" if key == config.source else "target",
            "model": agent.model.key, "has_pair": agent.has_pair,
            "kl_reference": "tuned model" if agent.has_pair else "the model unsteered",
            "map": _without_timing(mine.get("map")),
            "points": {name: _point_row(r, none, tuned) for name, r in mine.items() if name != "map"},
        }  # fmt: skip
    before, after = {}, {}
    for key, entry in agents.items():
        vector = "native" if key == config.source else "projected"
        steered = entry["points"].get(f"{vector}/lambda_{config.homophily_lambda:g}")
        if "none" in entry["points"] and steered is not None:
            before[key] = {
                label: entry["points"]["none"][f] for label, f in HOMOPHILY_METRICS.items()
            }
            after[key] = {label: steered[f] for label, f in HOMOPHILY_METRICS.items()}
    complete = len(before) == len(agents) and len(agents) > 1
    return {
        "phase": "2.3", "title": "Cross-architecture transfer of steering vectors",
        "settings": config.settings(), **data, "agents": agents,
        "homophily": {"lambda": config.homophily_lambda, "before": before, "after": after,
                      "spread": homophily(before, after).rows() if complete else None},
        "created": utc_timestamp(), "mahals_version": __version__,
    }  # fmt: skip


def log_tables(summary: Mapping[str, Any]) -> None:
    """The console tables: every point, each target's maps, the homophily spread."""
    banner(
        log, "PHASE 2.3 RESULTS (λ = 0: no steering; tuned: the pair's tuned model)", rule=WIDE_RULE
    )
    rows = [
        (agent, p["vector"], p["lambda"], p["margin"], "-" if p["gap_closure"] is None else p["gap_closure"],
         p["refusal_unsafe"], p["over_refusal_safe"], p["kl"], p["perplexity_neutral"], p["aqi_last"])
        for agent, entry in summary["agents"].items() for p in entry["points"].values()
    ]  # fmt: skip
    table(log, ("Agent", "Vector", "λ", "Margin", "G", "Refusal", "OverRef", "KL", "PPL", "AQI(last)"),
          (24, 11, 8, 10, 9, 9, 9, 9, 14, 10), rows, rule="-" * 113)  # fmt: skip
    for agent, entry in summary["agents"].items():
        if entry["map"] is None:
            continue
        banner(log, f"MAPS {summary['settings']['source']} → {agent} ({entry['map']['method']}, "
                    f"{entry['map']['matching']})", rule=WIDE_RULE)  # fmt: skip
        table(log, ("Target", "Source", "R²", "CentCos", "cos(p,native)", "|cos| rand", "CKA"),
              (8, 8, 9, 9, 15, 12, 9),
              [(e["target_layer"], e["source_layer"], e["held_out_r2"], e["held_out_centered_cosine"],
                e.get("cos_projected_native", "-"), e.get("mean_abs_cos_random_source_native", "-"), e["cka"])
               for e in entry["map"]["layers"]], rule="-" * 70)  # fmt: skip
    spread = summary["homophily"]["spread"]
    if spread:
        banner(
            log,
            f"HOMOPHILY (std across agents, λ = {summary['homophily']['lambda']:g})",
            rule=WIDE_RULE,
        )
        table(log, ("Metric", "Before", "After", "Ratio"), (24, 12, 12, 10),
              [(r["metric"], r["std_before"], r["std_after"], r["std_ratio"]) for r in spread])  # fmt: skip


PANELS = (("preference margin (nats)", "margin"), ("gap closure G", "gap_closure"),
          ("refusal on unsafe", "refusal_unsafe"), ("over-refusal on safe", "over_refusal_safe"),
          ("KL to reference, nats/token", "kl"), ("perplexity, neutral text", "perplexity_neutral"),
          ("AQI, last layer", "aqi_last"))  # fmt: skip


def save_figures(config: Phase23Config, summary: Mapping[str, Any]) -> dict[str, Path]:
    """``transfer_vs_lambda.png`` (every score vs λ, per agent and vector; λ = 0 is the
    unsteered model), ``cosine_per_layer.png`` (held-out R², cos(projected, native) and the
    random-source control per target layer) and ``homophily.png``."""
    figures: dict[str, Path] = {}
    fig = Figure(figsize=(16, 7.5))
    axes = [fig.add_subplot(2, 4, i + 1) for i in range(len(PANELS))]
    for agent, entry in summary["agents"].items():
        points, none = entry["points"], entry["points"].get("none")
        for vector in ("projected", "random", "native"):
            sweep = sorted((p["lambda"], p) for p in points.values() if p["vector"] == vector)
            sweep = ([(0.0, none)] if none else []) + sweep
            if len(sweep) < 2:
                continue
            for ax, (_, field) in zip(axes, PANELS, strict=True):
                values = [(lam, p[field]) for lam, p in sweep if p[field] is not None]
                ax.plot(
                    [v[0] for v in values],
                    [v[1] for v in values],
                    marker="o",
                    label=f"{agent}: {vector}",
                )
        if "tuned" in points:
            for ax, (_, field) in zip(axes, PANELS, strict=True):
                if points["tuned"][field] is not None:
                    ax.axhline(points["tuned"][field], linestyle=":", color="grey", linewidth=1)
    for ax, (title, _) in zip(axes, PANELS, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Phase 2.3: {config.source} vector on other architectures (dotted: tuned model)",
        fontsize=10,
    )
    fig.tight_layout()
    figures["transfer_vs_lambda"] = plots.save_png(fig, config.out_dir / "transfer_vs_lambda.png")
    maps = {agent: e["map"] for agent, e in summary["agents"].items() if e["map"] is not None}
    if maps:
        fig = Figure(figsize=(6.5, 4))
        ax = fig.add_subplot(1, 1, 1)
        for agent, fitted in maps.items():
            layers = [e["target_layer"] for e in fitted["layers"]]
            ax.plot(
                layers,
                [e["held_out_r2"] for e in fitted["layers"]],
                marker=".",
                label=f"{agent}: held-out R²",
            )
            if fitted["has_native"]:
                ax.plot(
                    layers,
                    [e["cos_projected_native"] for e in fitted["layers"]],
                    marker="o",
                    label=f"{agent}: cos(projected, native)",
                )
                ax.plot(layers, [e["mean_abs_cos_random_source_native"] for e in fitted["layers"]],
                        marker="x", linestyle="--", label=f"{agent}: mean |cos|, random source dirs")  # fmt: skip
        ax.set_xlabel("target layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures["cosine_per_layer"] = plots.save_png(fig, config.out_dir / "cosine_per_layer.png")
    spread = summary["homophily"]
    if spread["spread"]:
        homophily_plot(spread["before"], spread["after"], path=config.out_dir / "homophily.png",
                       title=f"Agents unsteered vs steered (λ = {spread['lambda']:g})")  # fmt: skip
        figures["homophily"] = config.out_dir / "homophily.png"
    return figures


def _without_timing(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A map item's result without its run time (that is in the checkpoint)."""
    return None if result is None else {k: v for k, v in result.items() if k != "seconds"}
