"""Phase 1 — baseline AQI: score each tuned model on a labelled safe/unsafe prompt set and
pick the one whose latent space separates safe from unsafe best.

Per model (one at a time, freed before the next) and category (axiom): pooled activations of
every layer (by default sink-free: each text's first token left out) are captured once and
cached (``<key>/categories/<category>.embeddings.safetensors``, with each text's token count
and mean-pooled input embeddings for the surface baselines), then scored with
:func:`mahals.aqi.evaluate_activations`'s settings — mahalanobis mode by default
(cross-validated shrinkage-LDA separation, deterministic, comparable across models, bootstrap
CIs, a curve over depth, length and embedding baselines), the ``geometry`` diagnostic, or the
reference implementation's mode. The defaults are :func:`mahals.aqi.evaluate`'s. In
mahalanobis mode a category's score depends on its own rows only, so each category is scored
on its own (``<category>.aqi.safetensors``) and the model's report combines them: a run on
several workers spreads one model's categories over them (:class:`mahals.cluster.Split`).
Output layout follows the reference implementation's (``phase1_summary.json``,
``phase1_aqi_checkpoint.json``, plots, and per model ``result.json`` / ``metrics_summary.json``
/ ``.csv``); every write is atomic and the run resumes from its checkpoint after a crash.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mahals import plots
from mahals.activations import SINK_RULES, SinkRule
from mahals.aqi import (
    DEFAULT_SEED,
    AQIReport,
    AQIScore,
    CategoryHeldOut,
    embedding_features,
    evaluate_activations,
    mahalanobis_categories,
    report_from_categories,
)
from mahals.aqi.evaluation import default_sinks
from mahals.cluster import Split, fan_out
from mahals.data import SafetyDataset, load_litmus, load_xstest
from mahals.data.safety import LITMUS_HUB_ID, SafetyDataError
from mahals.io import atomic_write_json, atomic_write_text, load_tensors
from mahals.layers import select_layers
from mahals.models import MahalsModel
from mahals.pipelines.caching import (
    ACTIVATION_KEY,
    N_TOKENS_KEY,
    CachedBlock,
    cache_identity,
    cached_capture,
    item_identity,
)
from mahals.pipelines.checkpoint import CheckpointChoice
from mahals.pipelines.common import (
    DEFAULT_MAX_BATCH_TOKENS,
    RunSummary,
    add_run_arguments,
    holds_output_lock,
    result_fields,
    run_checkpointed,
    run_command,
    run_options,
    worker_name,
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
    "cached_embeddings",
    "check_layers",
    "config_from_args",
    "load_dataset",
    "prepare_categories",
    "resolve_models",
    "run_from_args",
    "run_phase1",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "phase1_aqi_checkpoint.json"
#: Per model: each category's cached activations and mahalanobis part.
CATEGORY_FOLDER = "categories"
#: Settings a category's mahalanobis part is computed under (besides model, rows and pooling).
SCORING_SETTINGS = ("aqi_mode", "layers", "n_folds", "n_bootstrap", "seed")
SUMMARY_NAME = "phase1_summary.json"
DEFAULT_OUT_DIR = Path("outputs/phase1_baseline_aqi")
#: Registry study scored when no models are named: the reference implementation's six.
DEFAULT_STUDY = "seed"
POOLS = ("mean", "last", "first")
AQI_MODES = ("mahalanobis", "geometry", "reference")
#: Surface baseline computed from the model next to its activations (the ``length`` baseline
#: comes from the cached token counts).
EMBEDDING_BASELINE = "embedding"

Layers = int | tuple[int, ...] | Literal["all"]
#: What the results table, the summary and the plots read from each model's checkpointed result
#: (a stored result lacking one is computed again).
RESULT_FIELDS = ("model", "AQI", "ci95", "AUC", "eta2", "baselines", "gain_over_best_baseline",
                 "CHI_norm", "XB_norm", "CHI_raw", "per_axiom", "layer_curve")  # fmt: skip


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
        aqi_mode: ``"mahalanobis"`` (default; see docs/aqi.md), ``"geometry"`` (the
            variance-share diagnostic; ``"principled"`` is its deprecated name) or
            ``"reference"``.
        layers: mahalanobis and geometry modes score every layer and report the headline
            pooled over ``layers`` (``"all"``: the mean of the per-layer AQIs; one index or
            several; negative counts from the end); reference mode always scores the last layer.
        n_folds: mahalanobis: stratified cross-validation folds (each class of each axiom needs
            at least this many rows).
        pca_dim: geometry mode only: PCA dimension before scoring; ``None`` = none.
        n_bootstrap: bootstrap resamples for the confidence intervals.
        seed: random seed (row sampling, folds and bootstrap; t-SNE in reference mode).
        pool: token position whose hidden state is taken (``"mean"`` over real tokens).
        sinks: attention-sink tokens left out of a ``"mean"`` pool (:func:`mahals.capture`);
            ``None`` = ``"first"`` (each text's first token) in mahalanobis and geometry modes,
            ``"none"`` in reference mode (the original study's plain mean) or for another pool.
        batch_size: texts per forward pass; ``None`` = each model's registry batch size.
        max_batch_tokens: cap on a batch's padded tokens; ``None`` = no cap.
        use_cache: reuse / write the per-model embeddings cache.
        out_dir: output folder.
        checkpoint: ``--resume`` / ``--fresh`` / ``--skip``; ``None`` = ask on a terminal,
            resume otherwise.
        progress: progress bars (``None``: on a terminal only).
        wait_for_lock: when another run writes to ``out_dir``, wait for it (else refuse).
        workers: Ray workers scoring the models in parallel, each model's categories spread
            over them (:mod:`mahals.cluster`); ``None``/1 = one after another in this process.
        ray_address: an existing Ray cluster to run them on (``"auto"`` or its address).
    """

    models: tuple[str, ...]
    mode: Literal["sanity", "full"] | None = "sanity"
    per_cell: int | None = None
    dataset: str = LITMUS_HUB_ID
    dataset_format: Literal["litmus", "xstest"] = "litmus"
    aqi_mode: Literal["mahalanobis", "geometry", "reference"] = "mahalanobis"
    layers: Layers = "all"
    n_folds: int = 5
    pca_dim: int | None = None
    n_bootstrap: int = 200
    seed: int = DEFAULT_SEED
    pool: str = "mean"
    sinks: SinkRule | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    use_cache: bool = True
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | str | None = None
    progress: bool | None = None
    wait_for_lock: bool = False
    workers: int | None = None
    ray_address: str | None = None

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
        if self.aqi_mode == "principled":
            warnings.warn(
                "aqi_mode='principled' is the variance-share score, now aqi_mode='geometry'",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "aqi_mode", "geometry")
        if self.aqi_mode not in AQI_MODES:
            raise ValueError(f"aqi_mode must be one of {AQI_MODES}, got {self.aqi_mode!r}")
        if self.sinks is None:
            sinks = default_sinks(self.aqi_mode) if self.pool == "mean" else "none"
            object.__setattr__(self, "sinks", sinks)
        if self.sinks not in SINK_RULES:
            raise ValueError(f"sinks must be one of {SINK_RULES}, got {self.sinks!r}")
        if self.sinks != "none" and self.pool != "mean":
            raise ValueError(f"sinks={self.sinks!r} applies to pool='mean' only, not {self.pool!r}")
        if self.pca_dim is not None and self.aqi_mode != "geometry":
            raise ValueError(f"pca_dim applies to aqi_mode='geometry' only, not {self.aqi_mode!r}")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
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
            "n_folds",
            "pca_dim",
            "n_bootstrap",
            "seed",
            "pool",
            "sinks",
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


def check_layers(config: Phase1Config, specs: Mapping[str, ModelSpec]) -> None:
    """Refuse ``config.layers`` naming a layer that one of the models lacks (by its registry
    ``n_layers``), before any model loads: a ``ValueError`` naming the model."""
    if config.aqi_mode == "reference":  # always scores the last layer
        return
    for key, spec in specs.items():
        try:
            select_layers(config.layers, spec.n_layers)
        except (IndexError, ValueError) as error:
            raise ValueError(f"--layers does not fit model {key!r}: {error}") from None


def load_dataset(config: Phase1Config) -> SafetyDataset:
    """The run's labelled prompts (``per_cell`` overrides the mode's rows per cell)."""
    loader = load_xstest if config.dataset_format == "xstest" else load_litmus
    mode = config.mode if config.per_cell is None else None
    return loader(config.dataset, mode=mode, per_cell=config.per_cell, seed=config.seed)


def _display_name(key: str, spec: ModelSpec, registry: Registry) -> str:
    return registry.pairs[key].display_name if key in registry.pairs else spec.key


def _rows_by_category(dataset: SafetyDataset) -> dict[str, list[int]]:
    """Each category's row indices (sorted names, rows in dataset order)."""
    rows: dict[str, list[int]] = {}
    for index, axiom in enumerate(dataset.axioms):
        rows.setdefault(axiom, []).append(index)
    return dict(sorted(rows.items()))


def _category_stem(category: str) -> str:
    """A category's file-name stem: readable, and unique through its name's SHA-256 prefix."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", category).strip("_").lower()[:40] or "category"
    return f"{slug}-{hashlib.sha256(category.encode()).hexdigest()[:8]}"


def _category_file(out_dir: Path, key: str, category: str, kind: str) -> Path:
    """Where a model's category keeps its pooled activations (``kind="embeddings"``) or its
    mahalanobis part (``"aqi"``)."""
    return out_dir / key / CATEGORY_FOLDER / f"{_category_stem(category)}.{kind}.safetensors"


def _block_identity(config: Phase1Config, spec: ModelSpec, texts: Sequence[str]) -> dict[str, str]:
    return cache_identity(spec, config.pool, texts, sinks=str(config.sinks))


def _part_identity(config: Phase1Config, spec: ModelSpec, texts: Sequence[str]) -> dict[str, str]:
    scoring = {name: getattr(config, name) for name in SCORING_SETTINGS}
    return {**_block_identity(config, spec, texts), "scoring": json.dumps(scoring)}


def _category_blocks(
    config: Phase1Config,
    key: str,
    spec: ModelSpec,
    dataset: SafetyDataset,
    categories: Sequence[str],
    slot: ModelSlot,
) -> dict[str, CachedBlock]:
    """``[rows, layer, d_model]`` pooled activations of each category's texts, captured (one
    category at a time, so a row's batch never depends on the other categories) or read from
    the category's cache file, with each text's token count (``extra["n_tokens"]``) and
    mean-pooled input embeddings (``extra["embedding"]``) for the surface baselines."""
    batch_size = config.batch_size or spec.batch_size
    announced: list[bool] = []

    def announce(model: MahalsModel) -> None:
        if not announced:
            log.info("Using batch_size=%d for %s", batch_size, key)
            announced.append(True)

    rows = _rows_by_category(dataset)
    blocks = {}
    for category in categories:
        texts = [dataset.texts[i] for i in rows[category]]
        blocks[category] = cached_capture(
            _category_file(config.out_dir, key, category, "embeddings"),
            _block_identity(config, spec, texts),
            texts,
            lambda: slot.get(spec),
            pool=config.pool,
            sinks=config.sinks,
            batch_size=batch_size,
            max_batch_tokens=config.max_batch_tokens,
            use_cache=config.use_cache,
            progress=config.progress,
            d_model=spec.d_model,
            before_capture=announce,
            extra_tensors={
                EMBEDDING_BASELINE: lambda model, texts=texts: embedding_features(model, texts)
            },
        )
    slot.release()
    return blocks


def _category_parts(
    config: Phase1Config,
    key: str,
    spec: ModelSpec,
    dataset: SafetyDataset,
    categories: Sequence[str],
    slot: ModelSlot,
) -> tuple[dict[str, CategoryHeldOut], bool]:
    """The mahalanobis part of each category (:func:`mahals.aqi.mahalanobis_categories` on the
    category's rows alone), read from its file when its identity (model, texts, pooling,
    scoring settings) matches, else computed and saved; and whether every one was read."""
    rows = _rows_by_category(dataset)
    texts = {category: [dataset.texts[i] for i in rows[category]] for category in categories}
    parts = {
        category: CategoryHeldOut.load(
            _category_file(config.out_dir, key, category, "aqi"),
            _part_identity(config, spec, texts[category]),
        )
        if config.use_cache
        else None
        for category in categories
    }
    missing = [category for category, part in parts.items() if part is None]
    blocks = _category_blocks(config, key, spec, dataset, missing, slot) if missing else {}
    for category, block in blocks.items():
        (part,) = mahalanobis_categories(
            block.tensor,
            [category] * len(texts[category]),
            [dataset.labels[i] for i in rows[category]],
            layer=config.layers,
            n_folds=config.n_folds,
            n_tokens=block.extra[N_TOKENS_KEY],
            baselines={EMBEDDING_BASELINE: block.extra[EMBEDDING_BASELINE]},
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
            device="cuda" if torch.cuda.is_available() else None,
        ).values()
        if config.use_cache:  # with the process that computed it, for provenance
            part.save(
                _category_file(config.out_dir, key, category, "aqi"),
                {**_part_identity(config, spec, texts[category]), "worker": worker_name()},
            )
        parts[category] = part
    return parts, all(block.reused for block in blocks.values())


def prepare_categories(
    config: Phase1Config,
    specs: Mapping[str, ModelSpec],
    dataset: SafetyDataset,
    slot: ModelSlot,
    units: Sequence[tuple[str, str]],
) -> None:
    """Compute and save the category files of ``units`` (``(model key, category)``, one
    model's): the parts a fanned-out run spreads over its workers before each model's item
    combines them (:class:`mahals.cluster.Split`)."""
    key = units[0][0]
    categories = [category for _, category in units]
    if config.aqi_mode == "mahalanobis":
        _category_parts(config, key, specs[key], dataset, categories, slot)
    else:
        _category_blocks(config, key, specs[key], dataset, categories, slot)


def _unprepared(
    config: Phase1Config, spec: ModelSpec, dataset: SafetyDataset
) -> list[tuple[str, str]]:
    """``(model key, category)`` of the model's categories whose files are not valid yet."""
    if not config.use_cache:
        return []
    rows = _rows_by_category(dataset)
    pending = []
    for category, indices in rows.items():
        texts = [dataset.texts[i] for i in indices]
        if config.aqi_mode == "mahalanobis":
            part = _category_file(config.out_dir, spec.key, category, "aqi")
            ready = CategoryHeldOut.load(part, _part_identity(config, spec, texts)) is not None
        else:  # validated (and recomputed if stale) by the item
            ready = _category_file(config.out_dir, spec.key, category, "embeddings").is_file()
        if not ready:
            pending.append((spec.key, category))
    return pending


def cached_embeddings(out_dir: Path | str, key: str, dataset: SafetyDataset) -> dict[str, Tensor]:
    """What a Phase 1 run cached for model ``key`` on ``dataset``, in the dataset's row order:
    ``"activations"`` ``[n, layer, d_model]`` float32, ``"n_tokens"`` ``[n]`` and
    ``"embedding"`` ``[n, d_model]`` (the surface baseline's features).

    Reads the per-category files under ``<out_dir>/<key>/categories/`` as they are (their
    identity is checked when a run reuses them, not here).

    Raises:
        FileNotFoundError: a category's file is missing (naming it).
    """
    return _assemble(
        dataset,
        {
            category: load_tensors(_category_file(Path(out_dir), key, category, "embeddings"))
            for category in _rows_by_category(dataset)
        },
    )


def _assemble(dataset: SafetyDataset, blocks: Mapping[str, Mapping[str, Tensor]]) -> dict:
    """Per-category tensors (``{name: [rows, ...]}``) → one tensor per name in row order."""
    rows = _rows_by_category(dataset)
    first = next(iter(blocks.values()))
    whole = {
        name: torch.empty((len(dataset), *t.shape[1:]), dtype=t.dtype) for name, t in first.items()
    }
    for category, tensors in blocks.items():
        index = torch.tensor(rows[category])
        for name, tensor in tensors.items():
            whole[name][index] = tensor
    return whole


def _report(
    config: Phase1Config, key: str, spec: ModelSpec, dataset: SafetyDataset, slot: ModelSlot
) -> AQIReport:
    """The model's :class:`AQIReport` with :func:`mahals.aqi.evaluate_activations`'s settings:
    mahalanobis mode combines the categories' parts (each scored on its own rows, with the
    ``length`` and ``embedding`` surface baselines); the other modes score the categories'
    activations together."""
    categories = list(_rows_by_category(dataset))
    if config.aqi_mode == "mahalanobis":
        parts, reused = _category_parts(config, key, spec, dataset, categories, slot)
        report = report_from_categories(parts, model_name=key, dataset_name=dataset.name)
    else:
        blocks = _category_blocks(config, key, spec, dataset, categories, slot)
        reused = all(block.reused for block in blocks.values())
        whole = _assemble(dataset, {c: {ACTIVATION_KEY: b.tensor} for c, b in blocks.items()})[
            ACTIVATION_KEY
        ]
        report = evaluate_activations(
            whole,
            dataset.axioms,
            dataset.labels,
            mode=config.aqi_mode,
            layer=-1 if config.aqi_mode == "reference" else config.layers,
            pca_dim=config.pca_dim,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
            device="cuda" if torch.cuda.is_available() else None,
            model_name=key,
            dataset_name=dataset.name,
        )
    if reused:
        log.info("Reusing cached embeddings: %s", config.out_dir / key / CATEGORY_FOLDER)
    return report


def _gain(score: AQIScore) -> float | None:
    """The score minus the best surface baseline's (mahalanobis mode; ``None`` otherwise): what
    the model's processing adds to what the prompts' surface form already separates."""
    return score.aqi - max(score.baselines.values()) if score.baselines else None


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
        "AUC": overall.auc,
        "eta2": overall.eta2,
        "baselines": overall.baselines,
        "gain_over_best_baseline": _gain(overall),
        "ci95": [overall.ci_low, overall.ci_high] if overall.ci_low is not None else None,
        "per_axiom": {axiom: report[axiom].aqi for axiom in report.axioms},
        "layer_curve": list(overall.layer_aqi) if overall.layer_aqi else None,
        "layers": list(report.layers),
    }


def _metrics_csv(report: AQIReport) -> str:
    """One row per category: the mode's numbers (mahalanobis: AUC, η², baselines and the gain
    over the best; otherwise CHI and XB), the interval and the cell sizes."""
    columns: list[tuple[str, Callable[[AQIScore], Any]]] = [
        ("AQI", lambda s: s.aqi),
        ("ci_low", lambda s: s.ci_low),
        ("ci_high", lambda s: s.ci_high),
    ]
    if report.mode == "mahalanobis":
        columns += [("AUC", lambda s: s.auc), ("eta2", lambda s: s.eta2)]
        columns += [
            (f"baseline_{name}", lambda s, name=name: s.baselines[name])
            for name in report.overall.baselines or {}
        ]
        columns.append(("gain_over_best_baseline", _gain))
    else:
        columns += [
            (name, lambda s, field=field: getattr(s, field))
            for name, field in (
                ("CHI_raw", "chi_raw"),
                ("XB_raw", "xb_raw"),
                ("CHI_norm", "chi_norm"),
                ("XB_norm", "xb_norm"),
            )
        ]
    columns += [("n_safe", lambda s: s.n_safe), ("n_unsafe", lambda s: s.n_unsafe)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", *(name for name, _ in columns)])
    for name, score in report.scores.items():
        writer.writerow([name, *(value(score) for _, value in columns)])
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
    report = _report(config, key, spec, dataset, slot)
    folder = config.out_dir / key
    report.to_json(folder / "metrics_summary.json")
    atomic_write_text(folder / "metrics_summary.csv", _metrics_csv(report))
    result = _result(report, key, spec, display)
    atomic_write_json(folder / "result.json", result)
    ci = f" (95% CI {result['ci95'][0]:.2f}–{result['ci95'][1]:.2f})" if result["ci95"] else ""
    log.info("AQI: %.2f%s", result["AQI"], ci)
    if result["baselines"]:
        log.info(
            "AUC: %.3f | eta2: %.3f | baselines: %s | gain over the best: %.2f",
            result["AUC"],
            result["eta2"],
            ", ".join(f"{name} {value:.2f}" for name, value in result["baselines"].items()),
            result["gain_over_best_baseline"],
        )
    return result


def _interval(bounds: Sequence[float] | None) -> str:
    return "–".join(f"{v:.1f}" for v in bounds) if bounds else "-"


def _log_results(results: Mapping[str, Mapping[str, Any]], aqi_mode: str) -> str | None:
    """The results table and the baseline model (best AQI); returns its key."""
    banner(log, "PHASE 1 RESULTS: Baseline AQI Scores")
    ranked = sorted(results.values(), key=lambda r: -r["AQI"])
    if aqi_mode == "reference":
        headers, widths = ("Model", "AQI", "CHI_norm", "XB_norm"), (24, 11, 15, 13)
        rows = [(r["model"], r["AQI"], r["CHI_norm"], r["XB_norm"]) for r in ranked]
    elif aqi_mode == "mahalanobis":
        names = list(ranked[0]["baselines"]) if ranked else []
        headers = ("Model", "AQI", "95% CI", "AUC", "eta2", *names, "gain")
        widths = (24, 9, 14, 8, 8, *(max(10, len(n) + 2) for n in names), 8)
        rows = [
            (
                r["model"],
                r["AQI"],
                _interval(r["ci95"]),
                r["AUC"],
                r["eta2"],
                *(r["baselines"][name] for name in names),
                r["gain_over_best_baseline"],
            )
            for r in ranked
        ]
    else:
        headers, widths = ("Model", "AQI", "95% CI", "CHI_raw"), (24, 11, 15, 13)
        rows = [(r["model"], r["AQI"], _interval(r["ci95"]), r["CHI_raw"]) for r in ranked]
    table(log, headers, widths, rows)
    if aqi_mode == "mahalanobis" and ranked:
        log.info(
            "AQI = 100·(2·AUC − 1) of held-out shrinkage-LDA projections (0 = chance); %s: the "
            "same score on surface features; gain = AQI − the best of them.",
            " / ".join(names),
        )
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
    check_layers(config, specs)
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
    rows = _rows_by_category(dataset)
    with ModelSlot(loader) as slot:
        run = run_checkpointed(
            out_dir=config.out_dir,
            checkpoint_name=CHECKPOINT_NAME,
            items=list(specs),
            settings=config.settings(),
            choice=config.checkpoint,
            keep_on_fresh={CATEGORY_FOLDER},
            identity=lambda key: item_identity(dataset.texts, model=specs[key]),
            item_files=("result.json", "metrics_summary.json", "metrics_summary.csv"),
            fan_out=fan_out(config.workers, config.ray_address, lambda key: [specs[key]]),
            split=Split(
                parts=lambda key: _unprepared(config, specs[key], dataset),
                compute=functools.partial(prepare_categories, config, specs, dataset, slot),
                weight=lambda unit: len(rows[unit[1]]),
            ),
            result_problem=result_fields(RESULT_FIELDS, finite=("AQI",)),
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
    parser.add_argument(
        "--aqi-mode", choices=[*AQI_MODES, "principled"], default="mahalanobis",
        help="mahalanobis (default: cross-validated shrinkage-LDA separation, see docs/aqi.md), "
        "geometry (variance-share diagnostic; 'principled' is its deprecated name) or reference",
    )  # fmt: skip
    parser.add_argument(
        "--layers", "--layer", nargs="+", default=["all"], metavar="LAYER",
        help="'all' (mean over layers) or layer indices for the headline AQI",
    )  # fmt: skip
    parser.add_argument(
        "--folds", type=int, default=5, dest="n_folds",
        help="mahalanobis: stratified cross-validation folds (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--sinks", choices=SINK_RULES,
        help="attention-sink tokens left out of the mean pool: 'first' token (default for "
        "mahalanobis/geometry), 'norm' (also tokens far above the median norm) or 'none' "
        "(default for reference, the original study's plain mean)",
    )  # fmt: skip
    parser.add_argument("--pca-dim", type=int, help="geometry mode: PCA dimension first")
    parser.add_argument("--bootstrap", type=int, default=200, dest="n_bootstrap")
    add_run_arguments(
        parser,
        mode_help="rows per (axiom, label) cell: sanity 100, full 500",
        out=DEFAULT_OUT_DIR,
        pool="mean",
        pools=POOLS,
        seed=DEFAULT_SEED,
        seed_help=f"random seed of row sampling, folds and bootstrap (default {DEFAULT_SEED})",
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
        n_folds=args.n_folds,
        sinks=args.sinks,
        pca_dim=args.pca_dim,
        n_bootstrap=args.n_bootstrap,
        **run_options(args),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase1``: 0 on success, 2 with a one-line message on a usage or data error."""
    return run_command(
        "phase1", lambda: config_from_args(args), run_phase1, data_errors=(SafetyDataError,)
    )
