"""Phase 2.2: apply the Phase 2.1 vectors and judge them with λ sweeps (same architecture).

For each pair with Phase 2.1 vectors (``<vectors_dir>/<pair>/steering_vector*.safetensors``):
the tuned model steered by ``−λv`` and the base model steered by ``+λv`` at the chosen layers
(default the vector's last five), for every λ; controls at λ = 1 on the base model: a random
direction with the same per-layer norms, the rejected-answer vector and the SVD-k vector; with
``scan_layers``, ``+v`` at one layer at a time. Each point is scored
(:func:`mahals.pipelines.phase22_pair.score_item`): preference margin (bootstrap CI),
accuracy, gap closure G(λ), KL(tuned ‖ steered), perplexity on neutral text, refusal and
over-refusal of greedy generations on XSTest, refusal log-odds, principled (mahalanobis) AQI
per layer, reference AQI at the last layer and ``‖h_steered − h_tuned‖ / ‖h_base − h_tuned‖``
at the last layer, at the last token of prompt + chosen answer of the held-out rows (the
position and data the vector was extracted from; mean over rows of the norms; the denominator
is the base λ = 0 point). Rows that extracted the vector never evaluate it: their SHA-256
hashes are stored with the vector and the evaluation rows are checked against them.

Speed: the points of one side with the same steered layers form a group, scored together
(:func:`mahals.pipelines.phase22_pair.score_group`): each point is a row block of a per-block
steer, so one forward (and one generation batch) carries several λ; the tuned reference is
computed once per pair and the AQI of layers below the first steered one once per side.

Outputs under ``out_dir`` (default ``outputs/phase22_same_arch_validation``): per point
``<pair>/<side>/<point>/result.json`` and ``generations.jsonl``; per pair ``aqi_vs_lambda.json``,
``aqi_vs_lambda.png``, ``behaviour_vs_lambda.png``; ``phase22_summary.json``; the checkpoint
``phase22_checkpoint.json`` (one result per point; ``--resume`` continues a killed run).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mahals import plots
from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.cluster import fan_out
from mahals.data.safety import SafetyDataError, load_xstest
from mahals.evaluation import EvaluationLeakError, gap_closure
from mahals.io import atomic_write_json
from mahals.pipelines.checkpoint import CheckpointChoice, add_checkpoint_flags
from mahals.pipelines.common import (
    RunSummary,
    add_cluster_arguments,
    require_positive,
    results_under,
    run_checkpointed,
    run_command,
)
from mahals.pipelines.console import WIDE_RULE, banner, device_line, table
from mahals.pipelines.phase2 import default_tokenizer_loader
from mahals.pipelines.phase22_pair import (
    CONTROLS,
    PairData,
    SweepPoint,
    aqi_layers_of_interest,
    load_pair_data,
    score_group,
    steered_layers,
    sweep_points,
    tuned_reference,
    unsteered_aqi,
)
from mahals.pipelines.slot import ModelLoader, ModelSlot, default_loader, resolve_registry
from mahals.registry import Registry, load_registry

__all__ = [
    "DEFAULT_LAMBDAS",
    "Phase22Config",
    "add_arguments",
    "demo_config",
    "findings",
    "run_from_args",
    "run_phase22",
]

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
DEFAULT_OUT_DIR = Path("outputs/phase22_same_arch_validation")
CHECKPOINT_NAME = "phase22_checkpoint.json"
SUMMARY_NAME = "phase22_summary.json"


@dataclass(frozen=True)
class Phase22Config:
    """Everything that defines a Phase 2.2 run.

    Attributes:
        pairs: registry pair keys with Phase 2.1 vectors in ``vectors_dir``.
        vectors_dir: the Phase 2.1 output folder.
        dataset, data_dir, split: the hh-rlhf rows that evaluate (see :mod:`mahals.data`).
        n_eval: held-out hh-rlhf rows scored per point (the first ones not used to extract).
        max_chars: keep only rows whose plain chosen transcript is at most this long.
        exclude_extraction_rows: skip rows whose hash is stored with the vector (``False``:
            an overlap is an error instead).
        xstest: XSTest csv or hub id (AQI prompts and generation prompts).
        aqi_per_cell: XSTest rows per (axiom, label) cell (``None``: all 450).
        n_generate: XSTest prompts generated from (random with ``seed``).
        max_new_tokens: greedy generation length.
        lambdas: the sweep's λ values.
        layers: steered layers: ``None`` = the vector's last five, ``"all"``, or a list.
        scan_layers: also ``+v`` (λ = 1) at each vector layer alone, on the base model.
        controls: which control vectors to run at λ = 1 on the base model, from ``"random"``
            (same per-layer norms), ``"rejected"`` and ``"svd"`` (SVD-k); ``True`` = all
            three, ``False`` = none.
        svd_component: which ``steering_vector_svd{k}`` is the SVD control.
        top_k: tuned-model tokens kept per answer position for the KL.
        n_bootstrap: resamples of the margin and KL intervals; ``aqi_bootstrap`` of AQI.
        reference_aqi: also the reference (t-SNE) AQI at the last layer.
        seed: random control, generation prompt choice, bootstraps, AQI folds.
        batch_size: texts per forward pass / generation batch (each run once per λ block).
        lambdas_per_forward: sweep points carried by one forward as row blocks (``None``: every
            point of a group; 1: one λ at a time). Results agree to float rounding.
        max_batch_tokens: padded tokens per forward over all blocks (bounds memory).
        max_generate_tokens: prompt + generated tokens per generation batch over all blocks.
        workers: λ blocks (one pair and side each) run in parallel on Ray workers
            (:mod:`mahals.cluster`); ``None``/1 = one after another in this process.
        ray_address: an existing Ray cluster to run them on (``"auto"`` or its address).
    """

    pairs: tuple[str, ...]
    vectors_dir: Path | str = Path("outputs/phase2_steering_vectors")
    dataset: str = "Anthropic/hh-rlhf"
    data_dir: str | None = None
    split: str = "test"
    n_eval: int = 200
    max_chars: int | None = None
    exclude_extraction_rows: bool = True
    xstest: str = "walledai/XSTest"
    aqi_per_cell: int | None = None
    n_generate: int = 100
    max_new_tokens: int = 64
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    layers: tuple[int, ...] | str | None = None
    scan_layers: bool = False
    controls: bool | tuple[str, ...] = True
    svd_component: int = 3
    top_k: int = 256
    n_bootstrap: int = 1000
    aqi_bootstrap: int = 0
    reference_aqi: bool = True
    seed: int = 0
    batch_size: int = 16
    lambdas_per_forward: int | None = None
    max_batch_tokens: int = 16384
    max_generate_tokens: int = 65536
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | None = None
    workers: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "vectors_dir", Path(self.vectors_dir))
        object.__setattr__(self, "pairs", tuple(self.pairs))
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        controls = (
            CONTROLS if self.controls is True else () if self.controls is False else self.controls
        )
        unknown = [c for c in controls if c not in CONTROLS]
        if unknown or isinstance(controls, str):
            raise ValueError(f"controls must be a subset of {CONTROLS}, got {self.controls!r}")
        object.__setattr__(self, "controls", tuple(c for c in CONTROLS if c in controls))
        if not self.pairs:
            raise ValueError("pairs is empty: name at least one pair with Phase 2.1 vectors")
        if 0.0 not in self.lambdas:
            raise ValueError(
                f"lambdas must include 0 (the unsteered reference), got {self.lambdas}"
            )
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be a list of ints, 'all' or None, got {self.layers!r}")
        require_positive(self, ("n_eval", "n_generate", "max_new_tokens", "top_k", "batch_size",
                                "max_batch_tokens", "max_generate_tokens"))  # fmt: skip
        if self.lambdas_per_forward is not None and self.lambdas_per_forward < 1:
            raise ValueError(
                f"lambdas_per_forward must be >= 1 or None, got {self.lambdas_per_forward}"
            )

    def settings(self) -> dict[str, Any]:
        """What makes results comparable (checkpointed; a resume must match it)."""
        keep = ("dataset", "data_dir", "split", "n_eval", "max_chars", "exclude_extraction_rows",
                "xstest", "aqi_per_cell", "n_generate", "max_new_tokens", "scan_layers",
                "controls", "svd_component", "top_k", "n_bootstrap", "aqi_bootstrap",
                "reference_aqi", "seed")  # fmt: skip
        layers = (
            self.layers
            if self.layers is None or isinstance(self.layers, str)
            else list(self.layers)
        )
        return {"pairs": list(self.pairs), "vectors_dir": str(self.vectors_dir),
                "lambdas": list(self.lambdas), "layers": layers,
                **{name: getattr(self, name) for name in keep}}  # fmt: skip


@dataclass(frozen=True)
class Phase22Summary(RunSummary):
    """What :func:`run_phase22` returns (items are ``<pair>/<side>/<point>``)."""


def run_phase22(
    config: Phase22Config,
    *,
    loader: ModelLoader = default_loader,
    registry: Registry | None = None,
    tokenizer_loader: Callable[[Any], Any] = default_tokenizer_loader,
) -> Phase22Summary:
    """Run the Phase 2.2 sweep of every pair of ``config`` (see the module docstring)."""
    loader, registry = resolve_registry(loader, registry)
    pairs = {key: registry.pair(key) for key in config.pairs}
    log.info("%s", device_line())
    banner(log, "Phase 2.2: Same-Architecture Validation (apply steering vectors)")
    log.info("Pairs: %s | lambdas: %s", list(config.pairs), list(config.lambdas))
    log.info("Output: %s", config.out_dir)
    aqi = load_xstest(config.xstest, per_cell=config.aqi_per_cell, seed=config.seed)
    data = {key: load_pair_data(pair, config, aqi, tokenizer_loader) for key, pair in pairs.items()}
    points: dict[str, tuple[PairData, SweepPoint]] = {}
    groups: dict[tuple[str, str, tuple[int, ...]], list[SweepPoint]] = {}
    for key, pair_data in data.items():
        chosen = pair_data.vectors["chosen"]
        for point in sweep_points(config, steered_layers(config, chosen), chosen.layers):
            points[f"{key}/{point.name}"] = (pair_data, point)
            groups.setdefault((key, point.side, point.layers), []).append(point)
    references: dict[str, Any] = {}
    prefixes: dict[tuple[str, str, int], list[float]] = {}
    scored: dict[str, dict[str, Any]] = {}

    with ModelSlot(loader) as slot:

        def compute(item: str) -> Mapping[str, Any]:
            # A group is computed whole (also its points already checkpointed, so a resumed
            # run puts the same λ blocks in each forward) and its results kept for its items.
            if item in scored:
                return scored.pop(item)
            pair_data, point = points[item]
            pair = pair_data.pair
            key = pair.key
            if key not in references:
                references[key] = tuned_reference(
                    pair_data, config, lambda: slot.get(pair.tuned, announce="TUNED model")
                )
            spec = pair.base if point.side == "base" else pair.tuned
            model = slot.get(spec, announce=f"{point.side.upper()} model")
            below = min(point.layers)
            if (key, point.side, below) not in prefixes:
                prefixes[key, point.side, below] = unsteered_aqi(
                    pair_data, config, model, point.side, below
                )
            group = groups[key, point.side, point.layers]
            log.info(
                "  %s/%s: %s", key, point.side, ", ".join(p.name.split("/")[-1] for p in group)
            )
            results = score_group(
                group, pair_data, config, model, references[key], prefixes[key, point.side, below]
            )
            scored.update({f"{key}/{name}": result for name, result in results.items()})
            return scored.pop(item)

        outcome = run_checkpointed(
            out_dir=config.out_dir,
            checkpoint_name=CHECKPOINT_NAME,
            items=list(points),
            settings=config.settings(),
            choice=config.checkpoint,
            compute=compute,
            keep_on_fresh=(),
            fan_out=fan_out(
                config.workers,
                config.ray_address,
                lambda item: [points[item][0].pair.base, points[item][0].pair.tuned],
                group=lambda item: item.rsplit("/", 1)[0],  # one task per pair and side
            ),
        )
    results = {item: dict(result) for item, result in outcome.results.items()}
    pending = tuple(item for item in points if item not in results)
    figures: dict[str, Path] = {}
    per_pair: dict[str, Any] = {}
    for key, pair_data in data.items():
        rows = results_under(results, key)
        chosen = pair_data.vectors["chosen"]
        per_pair[key] = _pair_summary(rows, steered_layers(config, chosen), pair_data)
        _log_table(key, per_pair[key])
        if per_pair[key]["complete"]:
            figures.update(_save_pair_plots(pair_data.folder, key, per_pair[key]))
    summary_path = atomic_write_json(
        config.out_dir / SUMMARY_NAME,
        {
            "phase": "2.2",
            "title": "Same-architecture validation: steering vectors applied",
            "settings": config.settings(),
            "data": {key: d.record for key, d in data.items()},
            "pairs": per_pair,
            "pending": list(pending),
            "created": utc_timestamp(),
            "mahals_version": __version__,
        },
    )
    log.info("\nSummary: %s", summary_path)
    return Phase22Summary(config.out_dir, summary_path, results, pending, figures)


def _pair_summary(
    rows: Mapping[str, dict[str, Any]], steered: Sequence[int], data: PairData
) -> dict[str, Any]:
    """Per-point headline numbers, with G(λ) and the distance ratio (need both λ = 0 points)."""
    base0, tuned0 = rows.get("base/lambda_0"), rows.get("tuned/lambda_0")
    complete = base0 is not None and tuned0 is not None
    n_layers = len(next(iter(rows.values()))["aqi"]["mahalanobis"]) if rows else 0
    interest = aqi_layers_of_interest(steered, n_layers) if rows else {}
    points = {}
    for name, r in rows.items():
        margin = r["margin"]["mean"]
        aqi_curve = r["aqi"]["mahalanobis"]
        points[name] = {
            "side": r["side"], "lambda": r["lambda"], "vector": r["vector"], "layers": r["layers"],
            "margin": r["margin"], "accuracy": r["accuracy"],
            "gap_closure": gap_closure(margin, base0["margin"]["mean"], tuned0["margin"]["mean"])
            if complete else None,
            "kl_tuned_steered": r["kl_tuned_steered"], "perplexity_neutral": r["perplexity_neutral"],
            "repetition_rate_3gram": r["repetition_rate_3gram"],
            "refusal_unsafe": r["refusal_unsafe"], "over_refusal_safe": r["over_refusal_safe"],
            "refusal_log_odds_unsafe": r["refusal_log_odds_unsafe"],
            "refusal_log_odds_safe": r["refusal_log_odds_safe"],
            "distance_ratio_last_layer": r["distance_to_tuned_last_layer"]
            / base0["distance_to_tuned_last_layer"]
            if complete and base0["distance_to_tuned_last_layer"] > 0 else None,
            "aqi_mahalanobis": {label: aqi_curve[layer] for label, layer in interest.items()},
            "aqi_mahalanobis_per_layer": aqi_curve,
            "aqi_reference_last_layer": r["aqi"].get("reference_last_layer"),
        }  # fmt: skip
    return {"complete": complete, "steered_layers": list(steered),
            "aqi_layers": dict(interest), "data": data.record, "points": points}  # fmt: skip


def _log_table(key: str, summary: Mapping[str, Any]) -> None:
    banner(
        log,
        f"PHASE 2.2 RESULTS: {key} (steered layers {summary['steered_layers']})",
        rule=WIDE_RULE,
    )
    rows = [
        (name, p["margin"]["mean"], p["gap_closure"] if p["gap_closure"] is not None else "-",
         p["refusal_unsafe"], p["over_refusal_safe"], p["kl_tuned_steered"]["mean"],
         p["perplexity_neutral"], p["aqi_mahalanobis"].get("last", float("nan")))
        for name, p in summary["points"].items()
    ]  # fmt: skip
    table(log, ("Point", "Margin", "G", "Refusal", "OverRef", "KL", "PPL", "AQI(last)"),
          (24, 10, 9, 9, 9, 9, 9, 10), rows, rule="-" * 89)  # fmt: skip


def findings(summary: Mapping[str, Any]) -> list[str]:
    """One line per headline point of a pair's summary (``phase22_summary.json["pairs"][key]``):
    base +v, tuned −v and the random-direction control at λ = 1 next to the unsteered points,
    as measured (KL to the tuned model, G, last-layer distance ratio, refusal, perplexity)."""
    points = summary["points"]
    shown = [("base, λ = 0 (unsteered)", "base/lambda_0"), ("base + v, λ = 1", "base/lambda_1"),
             ("base + random direction, λ = 1 (control)", "base/control_random"),
             ("tuned, λ = 0 (unsteered)", "tuned/lambda_0"), ("tuned − v, λ = 1", "tuned/lambda_1")]  # fmt: skip
    lines = []
    for label, name in shown:
        p = points.get(name)
        if p is None:
            continue
        ratio, g = p["distance_ratio_last_layer"], p["gap_closure"]
        lines.append(
            f"{label:<42} KL(tuned‖·) {p['kl_tuned_steered']['mean']:.3f}  "
            f"G {'-' if g is None else f'{g:+.2f}'}  "
            f"dist. ratio {'-' if ratio is None else f'{ratio:.2f}'}  "
            f"refusal {p['refusal_unsafe']:.2f}  PPL {p['perplexity_neutral']:.1f}"
        )
    return lines


def _sweep(summary: Mapping[str, Any], side: str) -> list[tuple[float, dict[str, Any]]]:
    points = [p for p in summary["points"].values() if p["side"] == side and p["vector"] == "chosen"
              and len(p["layers"]) == len(summary["steered_layers"])]  # fmt: skip
    return sorted(((p["lambda"], p) for p in points), key=lambda pair: pair[0])


def _controls(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in summary["points"].values() if p["vector"] != "chosen"]


def _panel(
    ax, summary: Mapping[str, Any], value: Callable[[dict[str, Any]], float], title: str
) -> None:
    for side, sign in (("base", "+λv on base"), ("tuned", "−λv on tuned")):
        sweep = _sweep(summary, side)
        ax.plot([lam for lam, _ in sweep], [value(p) for _, p in sweep], marker="o", label=sign)
    for control in _controls(summary):
        ax.scatter(
            [control["lambda"]], [value(control)], marker="x", label=f"control: {control['vector']}"
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("λ")
    ax.grid(alpha=0.3)


def _save_pair_plots(folder: Path, key: str, summary: Mapping[str, Any]) -> dict[str, Path]:
    interest = summary["aqi_layers"]
    aqi = {label: {side: [(lam, p["aqi_mahalanobis"][label]) for lam, p in _sweep(summary, side)]
                   for side in ("base", "tuned")} for label in interest}  # fmt: skip
    atomic_write_json(folder / "aqi_vs_lambda.json", {
        "pair": key, "layers": interest, "steered_layers": summary["steered_layers"],
        "mahalanobis": aqi,
        "reference_last_layer": {side: [(lam, p["aqi_reference_last_layer"]) for lam, p in _sweep(summary, side)]
                                 for side in ("base", "tuned")},
        "controls": {c["vector"]: c["aqi_mahalanobis"] for c in _controls(summary)},
    })  # fmt: skip
    fig = Figure(figsize=(4.2 * len(interest), 3.6))
    for index, (label, layer) in enumerate(interest.items()):
        ax = fig.add_subplot(1, len(interest), index + 1)
        _panel(
            ax,
            summary,
            lambda p, label=label: p["aqi_mahalanobis"][label],
            f"AQI, {label} (layer {layer})",
        )
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"{key}: principled AQI vs λ", fontsize=10)
    fig.tight_layout()
    paths = {f"{key}/aqi_vs_lambda": plots.save_png(fig, folder / "aqi_vs_lambda.png")}
    panels = (
        ("preference margin (nats)", lambda p: p["margin"]["mean"]),
        ("gap closure G(λ)", lambda p: p["gap_closure"]),
        ("refusal on unsafe", lambda p: p["refusal_unsafe"]),
        ("over-refusal on safe", lambda p: p["over_refusal_safe"]),
        ("KL(tuned ‖ steered), nats/token", lambda p: p["kl_tuned_steered"]["mean"]),
        ("perplexity, neutral text", lambda p: p["perplexity_neutral"]),
    )
    fig = Figure(figsize=(12, 6.4))
    for index, (title, value) in enumerate(panels):
        _panel(fig.add_subplot(2, 3, index + 1), summary, value, title)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"{key}: behaviour vs λ", fontsize=10)
    fig.tight_layout()
    paths[f"{key}/behaviour_vs_lambda"] = plots.save_png(fig, folder / "behaviour_vs_lambda.png")
    return paths


DEMO_PAIRS = ("SmolLM2_DPO_demo", "SmolLM2_format_demo")


def demo_config(
    out_dir: str | Path = "outputs/demo/phase22_same_arch_validation",
    *,
    vectors_dir: str | Path = "outputs/demo/phase2_steering_vectors",
    hh_rlhf_root: str | Path | None = None,
    pair: str | None = None,
    registry: Registry | None = None,
    checkpoint: CheckpointChoice | None = None,
) -> Phase22Config:
    """A short offline Phase 2.2 (SmolLM2-135M, CPU): λ ∈ {−1, 0, 1} on both sides and the
    random-direction control at λ = 1 (the rejected-answer and SVD-3 controls are left out to
    keep the demo within its time: ``controls=True`` adds them), 16 held-out
    hh-rlhf ``harmless-base`` rows (short ones, as the Phase 2.1 demo; the pair's
    ``evaluation`` split), 80 XSTest prompts for AQI (5 per cell), 8 generations of 16 tokens,
    no reference AQI (t-SNE is the slow part on a CPU). Each side's points run as row blocks
    of one forward. ``pair`` defaults to the DPO demo pair when the registry has it, else the
    format pair (the same weights; its vector is a format vector, not a tuning vector).

    Run the Phase 2.1 demo (:func:`mahals.pipelines.demo.phase2_demo_config`) into
    ``vectors_dir`` first.
    """
    from mahals.pipelines.demo import DEMO_MAX_CHARS, DEMO_SUBSET, find_demo_hh_rlhf

    registry = registry or load_registry()
    if pair is None:
        pair = next(key for key in DEMO_PAIRS if key in registry.pairs)
    hh_rlhf = find_demo_hh_rlhf(hh_rlhf_root)
    return Phase22Config(
        pairs=(pair,), vectors_dir=vectors_dir, dataset=str(hh_rlhf), data_dir=DEMO_SUBSET,
        split="test", n_eval=16, max_chars=DEMO_MAX_CHARS,
        xstest=str(hh_rlhf.parent / "xstest" / "xstest_prompts.csv"), aqi_per_cell=5,
        n_generate=8, max_new_tokens=16, lambdas=(-1.0, 0.0, 1.0), controls=("random",), top_k=64, n_bootstrap=500,
        reference_aqi=False, batch_size=16, out_dir=out_dir, checkpoint=checkpoint,
    )  # fmt: skip


# -------------------------------------------------------------------------------------- CLI


def _layers(text: str) -> tuple[int, ...] | str:
    return "all" if text == "all" else tuple(int(x) for x in text.replace(",", " ").split())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals phase22`` options."""
    parser.add_argument(
        "--pairs", nargs="+", metavar="KEY", required=True, help="registry pair keys"
    )
    parser.add_argument("--vectors", type=Path, default=Path("outputs/phase2_steering_vectors"),
                        help="Phase 2.1 output folder")  # fmt: skip
    parser.add_argument(
        "--dataset", default="Anthropic/hh-rlhf", help="hh-rlhf hub id or local folder"
    )
    parser.add_argument("--data-dir", help="hh-rlhf subset (default: all)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out preference rows")
    parser.add_argument("--max-chars", type=int)
    parser.add_argument("--xstest", default="walledai/XSTest", help="XSTest csv or hub id")
    parser.add_argument("--aqi-per-cell", type=int, help="XSTest rows per cell (default: all)")
    parser.add_argument("--n-generate", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument(
        "--layers", type=_layers, help="'all' or a list, e.g. '20,21,22' (default: last five)"
    )
    parser.add_argument("--scan-layers", action="store_true", help="also +v at one layer at a time")
    parser.add_argument(
        "--controls", nargs="*", choices=CONTROLS, default=list(CONTROLS),
        help="control vectors at λ = 1 (default all three; none with no names)",
    )  # fmt: skip
    parser.add_argument("--no-controls", dest="controls", action="store_const", const=[])
    parser.add_argument("--no-reference-aqi", dest="reference_aqi", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--lambdas-per-forward", type=int, help="λ blocks per forward (default: all of a group)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="padded tokens per forward"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    add_checkpoint_flags(parser)
    add_cluster_arguments(parser)


def config_from_args(args: argparse.Namespace) -> Phase22Config:
    return Phase22Config(
        pairs=tuple(args.pairs), vectors_dir=args.vectors, dataset=args.dataset,
        data_dir=args.data_dir, split=args.split, n_eval=args.n_eval, max_chars=args.max_chars,
        xstest=args.xstest, aqi_per_cell=args.aqi_per_cell, n_generate=args.n_generate,
        max_new_tokens=args.max_new_tokens, lambdas=tuple(args.lambdas), layers=args.layers,
        scan_layers=args.scan_layers, controls=tuple(args.controls), reference_aqi=args.reference_aqi,
        seed=args.seed, batch_size=args.batch_size, lambdas_per_forward=args.lambdas_per_forward,
        max_batch_tokens=args.max_batch_tokens, out_dir=args.out,
        checkpoint=args.checkpoint_choice, workers=args.workers, ray_address=args.ray_address,
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase22``: 0 on success, 2 with a one-line message on a usage or data error."""
    return run_command("phase22", lambda: config_from_args(args), run_phase22,
                       data_errors=(EvaluationLeakError, SafetyDataError))  # fmt: skip
