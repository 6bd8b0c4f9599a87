"""Phase 2.2 for one pair: its vectors, held-out data, the tuned reference, and one sweep point.

A sweep point (an *item* of the checkpointed run) is one side of the pair (``base`` steered by
``+λv`` or ``tuned`` steered by ``−λv``) or a control, scored by :func:`score_item`. Every
point of a pair reads the same held-out hh-rlhf rows and XSTest prompts, formatted as that
side read them in Phase 2.1 (its pairing rule). The tuned model's answer-token distributions
and last-layer states are computed once per pair (``<pair>/reference/``) for the KL and the
distance ratio.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mahals.activations import capture
from mahals.aqi import evaluate_activations
from mahals.data.hh_rlhf import PreferencePair, Turn, format_conversation, load_hh_rlhf
from mahals.data.safety import SafetyDataset
from mahals.evaluation import (
    NEUTRAL_TEXTS,
    TopKReference,
    bootstrap_mean,
    check_disjoint_rows,
    generate_and_judge,
    kl_to_reference,
    perplexity,
    preference_margins,
    reference_top_k,
    refusal_log_odds,
    repetition_rate,
    row_hash,
    scored_texts,
)
from mahals.io import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from mahals.models import MahalsModel
from mahals.pairs import pair_row_splits
from mahals.pipelines.conversations import is_format_pair
from mahals.pipelines.phase2_pair import vector_files
from mahals.registry import ModelPair
from mahals.steering import Steering, SteeringVector, steer

if TYPE_CHECKING:
    from mahals.pipelines.phase22 import Phase22Config

__all__ = ["PairData", "SweepPoint", "load_pair_data", "score_item", "sweep_points"]

log = logging.getLogger(__name__)

CONTROLS = ("random", "rejected", "svd")


@dataclass(frozen=True)
class SweepPoint:
    """One item: ``side`` model steered with ``sign · λ · vector`` at ``layers``."""

    name: str
    side: str  # "base" | "tuned"
    lam: float
    vector: str  # "chosen" | "random" | "rejected" | "svd"
    layers: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "lambda": self.lam, "vector": self.vector,
                "layers": list(self.layers)}  # fmt: skip


def sweep_points(config: Phase22Config, steered: Sequence[int], all_layers: Sequence[int]) -> list[SweepPoint]:
    """The pair's items in run order: tuned side first (its model is loaded for the reference),
    then base, controls (base, λ = 1) and the per-layer scan (base, λ = 1)."""
    points = [
        SweepPoint(f"{side}/lambda_{lam:g}", side, lam, "chosen", tuple(steered))
        for side in ("tuned", "base")
        for lam in config.lambdas
    ]
    if config.controls:
        points += [SweepPoint(f"base/control_{c}", "base", 1.0, c, tuple(steered)) for c in CONTROLS]
    if config.scan_layers:
        points += [SweepPoint(f"base/scan_layer_{layer}", "base", 1.0, "chosen", (layer,)) for layer in all_layers]
    return points


@dataclass
class PairData:
    """What every sweep point of one pair reads."""

    pair: ModelPair
    folder: Path
    vectors: dict[str, SteeringVector]
    eval_rows: tuple[PreferencePair, ...]
    prompts: dict[str, list[str]]  # side -> evaluation prompt texts (generation prompt appended)
    aqi_prompts: dict[str, list[str]]  # side -> XSTest prompt texts
    aqi: SafetyDataset
    generate_rows: list[int]  # rows of ``aqi`` that are generated from
    record: dict[str, Any]

    @property
    def reference_dir(self) -> Path:
        return self.folder / "reference"


def _random_like(vector: SteeringVector, seed: int) -> SteeringVector:
    """A random direction per layer with the vector's per-layer norms (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(vector.vectors.shape, generator=generator, dtype=torch.float64)
    rows = rows / rows.norm(dim=-1, keepdim=True) * vector.vectors.double().norm(dim=-1, keepdim=True)
    return SteeringVector(rows.to(vector.vectors.dtype), vector.layers, kind="random_control")


def _styles(pair: ModelPair, rule: str) -> dict[str, str]:
    """Which format each side read in Phase 2.1 (see :mod:`mahals.pipelines.conversations`)."""
    if rule == "plain":
        return {"base": "plain", "tuned": "plain"}
    if rule == "native" or is_format_pair(pair):
        return {"base": "plain", "tuned": "chat"}
    return {"base": "chat", "tuned": "chat"}


def _prompt(pair: PreferencePair, style: str, tokenizer: Any) -> str:
    """The conversation up to the answer; plain style ends with ``"Assistant: "`` so that both
    sides score the same answer token ids (the answer is tokenised on its own)."""
    text = format_conversation(pair, None, tokenizer, style=style)  # type: ignore[arg-type]
    return text + " " if style == "plain" else text


def load_pair_data(
    pair: ModelPair,
    config: Phase22Config,
    aqi: SafetyDataset,
    tokenizer_loader: Callable[[Any], Any],
) -> PairData:
    """The pair's vectors (Phase 2.1 output) and held-out data; refuses rows used to extract."""
    vector_dir = config.vectors_dir / pair.key
    chosen_file, rejected_file, svd_file = vector_files(config.svd_component)
    paths = {"chosen": chosen_file, "rejected": rejected_file, "svd": svd_file}
    missing = [name for name in paths.values() if not (vector_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"pair {pair.key}: no Phase 2.1 vectors {missing} in {vector_dir}")
    vectors = {kind: SteeringVector.load(vector_dir / name) for kind, name in paths.items()}
    vectors["random"] = _random_like(vectors["chosen"], config.seed)
    extraction = vectors["chosen"].extra.get("row_sha256")
    if not extraction:
        raise FileNotFoundError(
            f"pair {pair.key}: {vector_dir / chosen_file} records no extraction row hashes "
            "(made before they were stored): rerun mahals phase2 for this pair"
        )
    rule = vectors["chosen"].extra.get("pairing") or pair.pairing or "shared-template"
    dataset = load_hh_rlhf(config.dataset, data_dir=config.data_dir, split=config.split, verbose=False)
    used = set(extraction)
    candidates = [row for row in dataset if config.max_chars is None
                  or len(format_conversation(row, "chosen", style="plain")) <= config.max_chars]  # fmt: skip
    if config.exclude_extraction_rows:
        candidates = [row for row in candidates if row_hash(row) not in used]
    splits = pair_row_splits(pair)
    if splits is not None:  # a pair built from hashed splits (the DPO demo pair)
        held_out = splits.split_of("evaluation")
        candidates = [row for row in candidates if row_hash(row) in held_out]
        used |= splits.all_except("evaluation")
    eval_rows = tuple(candidates[: config.n_eval])
    if len(eval_rows) < 2:
        raise FileNotFoundError(f"pair {pair.key}: {len(eval_rows)} held-out hh-rlhf rows in {dataset.source}")
    check_disjoint_rows([row_hash(row) for row in eval_rows], used, what=f"{pair.key} vector")
    styles = _styles(pair, rule)
    tokenizer = tokenizer_loader(pair.tuned) if "chat" in styles.values() else None
    prompts = {side: [_prompt(row, style, tokenizer) for row in eval_rows] for side, style in styles.items()}
    aqi_prompts = {
        side: [_prompt(PreferencePair((Turn("user", text),), "", "", i), style, tokenizer)
               for i, text in enumerate(aqi.texts)]
        for side, style in styles.items()
    }  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(aqi), generator=generator).tolist()
    generate_rows = sorted(order[: config.n_generate])
    record = {
        "pairing": rule,
        "styles": styles,
        "eval_rows": len(eval_rows),
        "eval_source_rows": [row.source_index for row in eval_rows],
        "extraction_rows": len(extraction),
        "overlap_with_extraction": 0,
        "aqi_prompts": len(aqi),
        "generated_prompts": len(generate_rows),
    }
    return PairData(pair, config.out_dir / pair.key, vectors, eval_rows, prompts, aqi_prompts, aqi,
                    generate_rows, record)  # fmt: skip


def _identity(data: PairData, config: Phase22Config) -> str:
    payload = {"settings": config.settings(), "pair": data.pair.key, "record": data.record}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pooled(model: MahalsModel, texts: Sequence[str], config: Phase22Config, pool: str) -> Tensor:
    ids = model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return capture(model, ids, pool=pool, batch_size=config.batch_size, progress=False).tensor  # type: ignore[union-attr]


def tuned_reference(
    data: PairData, config: Phase22Config, model: Callable[[], MahalsModel]
) -> tuple[TopKReference, Tensor]:
    """The tuned model's top-k answer distributions and last-layer XSTest states, cached in
    ``<pair>/reference/`` (recomputed when the run's identity differs)."""
    path, identity_file = data.reference_dir / "tuned.safetensors", data.reference_dir / "identity"
    identity = _identity(data, config)
    if path.is_file() and identity_file.is_file() and identity_file.read_text() == identity:
        saved = load_tensors(path)
        return TopKReference(saved["log_probs"], saved["token_ids"], saved["counts"]), saved["h_last"]
    tuned = model()
    texts = scored_texts(tuned, data.prompts["tuned"], [row.chosen for row in data.eval_rows])
    reference = reference_top_k(tuned, texts, k=config.top_k, batch_size=config.batch_size, interventions=())
    pool = data.vectors["chosen"].pool or "last"
    h_last = _pooled(tuned, data.aqi_prompts["tuned"], config, pool)[:, -1].float()
    save_tensors(path, {**reference.tensors(), "h_last": h_last})
    atomic_write_text(identity_file, identity)
    return reference, h_last


def _interval(values: Tensor, config: Phase22Config) -> dict[str, float]:
    interval = bootstrap_mean(values, n_bootstrap=config.n_bootstrap, seed=config.seed)
    return {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high}


def _aqi(states: Tensor, data: PairData, config: Phase22Config) -> dict[str, Any]:
    layers = list(range(states.shape[1]))
    report = evaluate_activations(
        states, data.aqi.axioms, data.aqi.labels, mode="mahalanobis", layer=layers,
        n_bootstrap=config.aqi_bootstrap, seed=config.seed,
    )  # fmt: skip
    overall = report.overall
    result = {"mahalanobis": list(overall.layer_aqi or ()), "mahalanobis_mean": overall.aqi}
    if config.reference_aqi:
        reference = evaluate_activations(
            states[:, -1], data.aqi.axioms, data.aqi.labels, mode="reference", seed=config.seed
        )
        result["reference_last_layer"] = reference.overall.aqi
    return result


def score_item(
    point: SweepPoint,
    data: PairData,
    config: Phase22Config,
    model: MahalsModel,
    reference: TopKReference,
    h_tuned_last: Tensor,
    folder: Path,
) -> dict[str, Any]:
    """Every score of one sweep point; writes ``result.json`` and ``generations.jsonl``."""
    sign = 1.0 if point.side == "base" else -1.0
    spec = Steering(data.vectors[point.vector], alpha=sign * point.lam, layers=point.layers)
    side, rows = point.side, data.eval_rows
    with steer(model, spec):
        margins = preference_margins(
            model, data.prompts[side], [r.chosen for r in rows], [r.rejected for r in rows],
            batch_size=config.batch_size,
        )  # fmt: skip
        texts = scored_texts(model, data.prompts[side], [r.chosen for r in rows])
        kl = kl_to_reference(model, texts, reference, batch_size=config.batch_size)
        ppl = perplexity(model, NEUTRAL_TEXTS, batch_size=config.batch_size)
        gen_prompts = [data.aqi_prompts[side][i] for i in data.generate_rows]
        gen_ids = model.tokenizer(gen_prompts, add_special_tokens=True)["input_ids"]
        log_odds = refusal_log_odds(model, gen_ids, batch_size=config.batch_size)
        judged = generate_and_judge(
            model, gen_ids, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size
        )
        states = _pooled(model, data.aqi_prompts[side], config, data.vectors["chosen"].pool or "last")
    unsafe = [data.aqi.labels[i] == "unsafe" for i in data.generate_rows]
    refused_unsafe = [r for r, u in zip(judged.refused, unsafe, strict=True) if u]
    refused_safe = [r for r, u in zip(judged.refused, unsafe, strict=True) if not u]
    odds = log_odds.tolist()
    distance = (states[:, -1].float() - h_tuned_last).norm(dim=-1).double().mean().item()
    result = {
        **point.to_dict(),
        "n_eval_rows": len(rows),
        "margin": _interval(margins.margins, config),
        "accuracy": margins.accuracy,
        "margins": margins.margins.tolist(),
        "kl_tuned_steered": _interval(kl, config),
        "perplexity_neutral": ppl,
        "repetition_rate_3gram": repetition_rate(judged.token_ids, n=3),
        "refusal_unsafe": sum(refused_unsafe) / max(1, len(refused_unsafe)),
        "over_refusal_safe": sum(refused_safe) / max(1, len(refused_safe)),
        "refusal_log_odds_unsafe": _mean([o for o, u in zip(odds, unsafe, strict=True) if u]),
        "refusal_log_odds_safe": _mean([o for o, u in zip(odds, unsafe, strict=True) if not u]),
        "distance_to_tuned_last_layer": distance,
        "aqi": _aqi(states, data, config),
    }
    lines = [
        json.dumps({"row": i, "label": data.aqi.labels[i], "prompt": data.aqi.texts[i],
                    "completion": text, "refused": refused})  # fmt: skip
        for i, text, refused in zip(data.generate_rows, judged.texts, judged.refused, strict=True)
    ]
    atomic_write_text(folder / "generations.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(folder / "result.json", result)
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def steered_layers(config: Phase22Config, vector: SteeringVector) -> tuple[int, ...]:
    """``config.layers`` resolved against the vector: default its last five, ``"all"``, or a list."""
    if config.layers is None:
        return tuple(vector.layers[-5:])
    if config.layers == "all":
        return tuple(vector.layers)
    missing = sorted(set(config.layers) - set(vector.layers))
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (layers {list(vector.layers)})")
    return tuple(sorted(config.layers))


def aqi_layers_of_interest(steered: Sequence[int], n_layers: int) -> Mapping[str, int]:
    """The first steered layer (AQI cannot move there: a pure translation), the first layer
    after the steered ones (when there is one) and the last layer."""
    layers = {"first_steered": min(steered), "last": n_layers - 1}
    if max(steered) + 1 < n_layers:
        layers["first_after_steered"] = max(steered) + 1
    return layers
