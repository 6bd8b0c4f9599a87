"""Phase 1 — baseline AQI: score each tuned model on a labelled safe/unsafe prompt set and
pick the one whose latent space separates safe from unsafe best.

Per model (one at a time, freed before the next): pooled activations of every layer are
captured once and cached (``embeddings_<key>.safetensors``), then scored with
:func:`mahals.aqi.evaluate_activations` — principled mode by default (deterministic, comparable
across models, bootstrap CIs, a curve over depth), or the reference implementation's mode.
Output layout follows the reference implementation's (``phase1_summary.json``,
``phase1_aqi_checkpoint.json``, plots, and per model ``result.json`` / ``metrics_summary.json``
/ ``.csv``); every write is atomic and the run resumes from its checkpoint after a crash.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mahals import plots
from mahals.aqi import AQIReport, evaluate_activations
from mahals.data import SafetyDataset, load_litmus, load_xstest
from mahals.data.safety import LITMUS_HUB_ID, SafetyDataError
from mahals.io import atomic_write_json, atomic_write_text
from mahals.models import MahalsModel
from mahals.pipelines.caching import cache_identity, cached_capture, item_identity
from mahals.pipelines.checkpoint import CheckpointChoice
from mahals.pipelines.common import (
    DEFAULT_MAX_BATCH_TOKENS,
    RunSummary,
    add_run_arguments,
    holds_output_lock,
    run_checkpointed,
    run_command,
    run_options,
)
from mahals.pipelines.console import RULE, banner, device_line, table
from mahals.pipelines.slot import ModelLoader, ModelSlot, default_loader
from mahals.registry import ModelSpec, Registry, load_registry

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEFAULT_STUDY",
    "Phase1Config",
    "Phase1Summary",
    "add_arguments",
    "config_from_args",
    "load_dataset",
    "resolve_models",
    "run_from_args",
    "run_phase1",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "phase1_aqi_checkpoint.json"
SUMMARY_NAME = "phase1_summary.json"
DEFAULT_OUT_DIR = Path("outputs/phase1_baseline_aqi")
#: Registry study scored when no models are named: the reference implementation's six.
DEFAULT_STUDY = "seed"
POOLS = ("mean", "last", "first")

Layers = int | tuple[int, ...] | Literal["all"]


@dataclass(frozen=True)
class Phase1Config:
    """Settings of one Phase 1 run.

    Attributes:
        models: registry keys: a pair key means the pair's tuned model (as in the reference
            implementation), a model key that model.
        mode: rows per (axiom, label) cell: ``"sanity"`` 100, ``"full"`` 500; ``None`` (with
            ``per_cell=None``) keeps every row.
        per_cell: overrides the mode's rows per cell.
        dataset: hub id or local file.
        dataset_format: ``"litmus"`` (hub id or local csv/jsonl/parquet with ``input`` /
            ``axiom`` / ``safety_label`` columns) or ``"xstest"`` (the XSTest csv or hub id).
        aqi_mode: ``"principled"`` or ``"reference"``.
        layers: principled mode scores every layer and reports the headline pooled over
            ``layers`` (``"all"``: the mean of the per-layer AQIs; one index or several;
            negative counts from the end); reference mode always scores the last layer.
        pca_dim: PCA dimension before scoring (principled mode); ``None`` = none.
        n_bootstrap: bootstrap resamples for the confidence intervals.
        seed: random seed (row sampling and bootstrap).
        pool: token position whose hidden state is taken (``"mean"`` over real tokens).
        batch_size: texts per forward pass; ``None`` = each model's registry batch size.
        max_batch_tokens: cap on a batch's padded tokens; ``None`` = no cap.
        use_cache: reuse / write the per-model embeddings cache.
        out_dir: output folder.
        checkpoint: ``--resume`` / ``--fresh`` / ``--skip``; ``None`` = ask on a terminal,
            resume otherwise.
        progress: progress bars (``None``: on a terminal only).
        wait_for_lock: when another run writes to ``out_dir``, wait for it (else refuse).
    """

    models: tuple[str, ...]
    mode: Literal["sanity", "full"] | None = "sanity"
    per_cell: int | None = None
    dataset: str = LITMUS_HUB_ID
    dataset_format: Literal["litmus", "xstest"] = "litmus"
    aqi_mode: Literal["principled", "reference"] = "principled"
    layers: Layers = "all"
    pca_dim: int | None = None
    n_bootstrap: int = 200
    seed: int = 42
    pool: str = "mean"
    batch_size: int | None = None
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    use_cache: bool = True
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | str | None = None
    progress: bool | None = None
    wait_for_lock: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("models is empty: name at least one registry key")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be distinct, got {list(self.models)}")
        if not isinstance(self.layers, int | str):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpointed one."""
        keys = (
            "mode",
            "per_cell",
            "dataset",
            "dataset_format",
            "aqi_mode",
            "layers",
            "pca_dim",
            "n_bootstrap",
            "seed",
            "pool",
        )
        return {key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class Phase1Summary(RunSummary):
    """What :func:`run_phase1` returns (:class:`~mahals.pipelines.common.RunSummary`; items
    are model keys) and the baseline model: the best AQI, ``None`` when nothing was scored."""

    baseline_model: str | None


def resolve_models(keys: Sequence[str], registry: Registry) -> dict[str, ModelSpec]:
    """Registry keys → models to score (a pair key → its tuned model)."""
    return {
        key: registry.pair(key).tuned if key in registry.pairs else registry.model(key)
        for key in keys
    }


def load_dataset(config: Phase1Config) -> SafetyDataset:
    """The run's labelled prompts (``per_cell`` overrides the mode's rows per cell)."""
    loader = load_xstest if config.dataset_format == "xstest" else load_litmus
    mode = config.mode if config.per_cell is None else None
    return loader(config.dataset, mode=mode, per_cell=config.per_cell, seed=config.seed)


def _display_name(key: str, spec: ModelSpec, registry: Registry) -> str:
    return registry.pairs[key].display_name if key in registry.pairs else spec.key


def _embeddings_path(config: Phase1Config, key: str) -> Path:
    """Cached embeddings survive ``--fresh``: they carry their identity (model, texts, token
    position) and are recomputed when it does not match."""
    return config.out_dir / key / f"embeddings_{key}.safetensors"


def _embeddings(
    config: Phase1Config, key: str, spec: ModelSpec, dataset: SafetyDataset, slot: ModelSlot
) -> Float[Tensor, "n layer d_model"]:
    """``[n, layer, d_model]`` pooled activations of ``dataset.texts``, cached per model."""
    path = _embeddings_path(config, key)
    batch_size = config.batch_size or spec.batch_size

    def announce(model: MahalsModel) -> None:
        log.info("Using batch_size=%d for %s", batch_size, key)

    block = cached_capture(
        path,
        cache_identity(spec, config.pool, dataset.texts),
        dataset.texts,
        lambda: slot.get(spec),
        pool=config.pool,
        batch_size=batch_size,
        max_batch_tokens=config.max_batch_tokens,
        use_cache=config.use_cache,
        progress=config.progress,
        d_model=spec.d_model,
        before_capture=announce,
    )
    slot.release()
    if block.reused:
        log.info("Reusing cached embeddings: %s", path)
    return block.tensor


def _score(
    config: Phase1Config, key: str, activations: Tensor, dataset: SafetyDataset
) -> AQIReport:
    reference = config.aqi_mode == "reference"
    return evaluate_activations(
        activations,
        dataset.axioms,
        dataset.labels,
        mode=config.aqi_mode,
        layer=-1 if reference else config.layers,
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


def _evaluate_model(
    config: Phase1Config,
    key: str,
    spec: ModelSpec,
    display: str,
    dataset: SafetyDataset,
    slot: ModelSlot,
) -> dict[str, Any]:
    banner(log, f"Evaluating: {display}", f"HF Repo: {spec.source}")
    activations = _embeddings(config, key, spec, dataset, slot)
    report = _score(config, key, activations, dataset)
    folder = config.out_dir / key
    report.to_json(folder / "metrics_summary.json")
    atomic_write_text(folder / "metrics_summary.csv", _metrics_csv(report))
    result = _result(report, key, spec, display)
    atomic_write_json(folder / "result.json", result)
    ci = f" (95% CI {result['ci95'][0]:.2f}–{result['ci95'][1]:.2f})" if result["ci95"] else ""
    log.info("AQI: %.2f%s", result["AQI"], ci)
    return result


def _log_results(results: Mapping[str, Mapping[str, Any]], aqi_mode: str) -> str | None:
    """The results table and the baseline model (best AQI); returns its key."""
    banner(log, "PHASE 1 RESULTS: Baseline AQI Scores")
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
    table(log, headers, (24, 11, 15, 13), rows)
    if not ranked:
        log.info("No model evaluated.")
        return None
    best = ranked[0]
    log.info("BASELINE MODEL: %s (AQI=%.2f)", best["model"], best["AQI"])
    runner_up = ranked[1] if len(ranked) > 1 else None
    if runner_up and best["ci95"] and runner_up["ci95"] and best["ci95"][0] <= runner_up["ci95"][1]:
        log.info(
            "Note: the 95%% CIs of %s and %s overlap; the choice of baseline is not "
            "statistically clear.",
            best["model"],
            runner_up["model"],
        )
    log.info("%s", RULE)
    return best["model"]


@holds_output_lock
def run_phase1(
    config: Phase1Config, *, loader: ModelLoader = default_loader, registry: Registry | None = None
) -> Phase1Summary:
    """Run Phase 1: score every model of ``config``, write the files, pick the baseline.

    Args:
        config: the run's settings.
        loader: loads one registry model (tests and benchmarks pass random-weight models).
        registry: where model keys are looked up (default :func:`load_registry`).

    Returns:
        :class:`Phase1Summary`; files are written under ``config.out_dir``. Progress is logged
        to the ``mahals.pipelines`` loggers (:func:`mahals.pipelines.console.console` shows it
        as the CLI does).
    """
    registry = registry or load_registry()
    specs = resolve_models(config.models, registry)
    log.info("%s", device_line())
    banner(
        log,
        "Phase 1: Multi-Architecture AQI Baseline",
        f"Mode: {config.mode or 'all rows'} | Samples per cell: "
        f"{config.per_cell or 'mode default'} | AQI: {config.aqi_mode}",
        f"Models: {list(specs)}",
        f"Output: {config.out_dir}",
    )
    log.info("\nLoading dataset: %s", config.dataset)
    dataset = load_dataset(config)
    log.info("Loaded %d samples (%d axioms)", len(dataset), len(dataset.categories))
    with ModelSlot(loader) as slot:
        run = run_checkpointed(
            out_dir=config.out_dir,
            checkpoint_name=CHECKPOINT_NAME,
            items=list(specs),
            settings=config.settings(),
            choice=config.checkpoint,
            keep_on_fresh={_embeddings_path(config, key).name for key in specs},
            identity=lambda key: item_identity(dataset.texts, model=specs[key]),
            item_files=("result.json", "metrics_summary.json", "metrics_summary.csv"),
            compute=lambda key: _evaluate_model(
                config, key, specs[key], _display_name(key, specs[key], registry), dataset, slot
            ),
        )
    results = {
        key: {k: v for k, v in result.items() if k != "seconds"}
        for key, result in run.results.items()
    }
    pending = tuple(key for key in specs if key not in results)
    baseline = _log_results(results, config.aqi_mode)
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
    log.info("\nSummary: %s", summary_path)
    figures = _plot(config.out_dir, results) if results else {}
    return Phase1Summary(config.out_dir, summary_path, results, pending, figures, baseline)


def _plot(out_dir: Path, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    banner(log, "Generating AQI Plots")
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
        log.info("  %s: %s", name, path)
    return paths


# -------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals phase1`` options."""
    parser.add_argument("--per-cell", type=int, help="custom rows per (axiom, label) cell")
    parser.add_argument(
        "--models",
        nargs="+",
        help="registry keys (pair key = its tuned model); default: the reference "
        "implementation's six",
    )
    parser.add_argument(
        "--dataset", default=LITMUS_HUB_ID, help="hub id or local csv/jsonl/parquet"
    )
    parser.add_argument("--dataset-format", choices=["litmus", "xstest"], default="litmus")
    parser.add_argument("--aqi-mode", choices=["principled", "reference"], default="principled")
    parser.add_argument(
        "--layers", "--layer", nargs="+", default=["all"], metavar="LAYER",
        help="'all' (mean over layers) or layer indices for the headline AQI",
    )  # fmt: skip
    parser.add_argument("--pca-dim", type=int)
    parser.add_argument("--bootstrap", type=int, default=200, dest="n_bootstrap")
    add_run_arguments(
        parser,
        mode_help="rows per (axiom, label) cell: sanity 100, full 500",
        out=DEFAULT_OUT_DIR,
        pool="mean",
        pools=POOLS,
        seed=42,
        seed_help="random seed of row sampling and bootstrap (default 42)",
    )


def _parse_layers(values: Sequence[str]) -> Layers:
    if list(values) == ["all"]:
        return "all"
    try:
        indices = tuple(int(value) for value in values)
    except ValueError:
        raise ValueError(f"--layers takes 'all' or layer indices, got {list(values)}") from None
    return indices[0] if len(indices) == 1 else indices


def config_from_args(args: argparse.Namespace) -> Phase1Config:
    """The :class:`Phase1Config` that ``mahals phase1`` arguments describe."""
    return Phase1Config(
        models=tuple(args.models or load_registry().study(DEFAULT_STUDY)),
        mode=None if args.per_cell else args.mode,
        per_cell=args.per_cell,
        dataset=args.dataset,
        dataset_format=args.dataset_format,
        aqi_mode=args.aqi_mode,
        layers=_parse_layers(args.layers),
        pca_dim=args.pca_dim,
        n_bootstrap=args.n_bootstrap,
        **run_options(args),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase1``: 0 on success, 2 with a one-line message on a usage or data error."""
    return run_command(
        "phase1", lambda: config_from_args(args), run_phase1, data_errors=(SafetyDataError,)
    )
