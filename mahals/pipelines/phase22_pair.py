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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mahals.aqi import evaluate_activations
from mahals.data.hh_rlhf import PreferencePair, Turn, format_conversation, load_hh_rlhf
from mahals.data.safety import SafetyDataset
from mahals.evaluation import (
    NEUTRAL_TEXTS,
    JudgedGenerations,
    MarginScores,
    TopKReference,
    bootstrap_mean,
    capture_blocks,
    check_disjoint_rows,
    generate_blocks,
    neutral_texts,
    perplexity_of,
    reference_top_k,
    repetition_rate,
    row_hash,
    score_answers,
    score_refusal,
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

__all__ = [
    "PairData",
    "SweepPoint",
    "TunedReference",
    "load_pair_data",
    "score_group",
    "sweep_points",
    "tuned_reference",
    "unsteered_aqi",
]

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


def sweep_points(
    config: Phase22Config, steered: Sequence[int], all_layers: Sequence[int]
) -> list[SweepPoint]:
    """The pair's items in run order: tuned side first (its model is loaded for the reference),
    then base, controls (base, λ = 1) and the per-layer scan (base, λ = 1)."""
    points = [
        SweepPoint(f"{side}/lambda_{lam:g}", side, lam, "chosen", tuple(steered))
        for side in ("tuned", "base")
        for lam in config.lambdas
    ]
    points += [
        SweepPoint(f"base/control_{c}", "base", 1.0, c, tuple(steered)) for c in config.controls
    ]
    if config.scan_layers:
        points += [
            SweepPoint(f"base/scan_layer_{layer}", "base", 1.0, "chosen", (layer,))
            for layer in all_layers
        ]
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
    rows = (
        rows / rows.norm(dim=-1, keepdim=True) * vector.vectors.double().norm(dim=-1, keepdim=True)
    )
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
    dataset = load_hh_rlhf(
        config.dataset, data_dir=config.data_dir, split=config.split, verbose=False
    )
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
        raise FileNotFoundError(
            f"pair {pair.key}: {len(eval_rows)} held-out hh-rlhf rows in {dataset.source}"
        )
    check_disjoint_rows([row_hash(row) for row in eval_rows], used, what=f"{pair.key} vector")
    styles = _styles(pair, rule)
    tokenizer = tokenizer_loader(pair.tuned) if "chat" in styles.values() else None
    prompts = {
        side: [_prompt(row, style, tokenizer) for row in eval_rows]
        for side, style in styles.items()
    }
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


@dataclass(frozen=True)
class TunedReference:
    """The tuned model, unsteered, on the held-out rows: its top-k answer distributions (for
    the KL) and its last-layer state at the last token of prompt + chosen answer ``[n, d]``
    (for the distance ratio)."""

    top_k: TopKReference
    h_last: Tensor


def tuned_reference(
    data: PairData, config: Phase22Config, model: Callable[[], MahalsModel]
) -> TunedReference:
    """The tuned model's :class:`TunedReference`, cached in ``<pair>/reference/`` (recomputed
    when the run's identity differs)."""
    path, identity_file = data.reference_dir / "tuned.safetensors", data.reference_dir / "identity"
    identity = _identity(data, config)
    if path.is_file() and identity_file.is_file() and identity_file.read_text() == identity:
        saved = load_tensors(path)
        return TunedReference(
            TopKReference(saved["log_probs"], saved["token_ids"], saved["counts"]), saved["h_last"]
        )
    tuned = model()
    texts = scored_texts(tuned, data.prompts["tuned"], [row.chosen for row in data.eval_rows])
    top_k = reference_top_k(
        tuned, texts, k=config.top_k, batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens, interventions=(),
    )  # fmt: skip
    h_last = score_answers(
        tuned, texts, state_layer=tuned.n_layers - 1, batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens, interventions=(),
    ).last_state[0]  # type: ignore[index]  # fmt: skip
    save_tensors(path, {**top_k.tensors(), "h_last": h_last})
    atomic_write_text(identity_file, identity)
    return TunedReference(top_k, h_last)


def unsteered_aqi(
    data: PairData, config: Phase22Config, model: MahalsModel, side: str, below: int
) -> list[float]:
    """Mahalanobis AQI of the unsteered ``side`` model at layers ``0 … below − 1``: a steer
    cannot change layers before the first one it writes, so every point of the side shares
    these (one capture per side instead of one per point)."""
    if below == 0:
        return []
    states = capture_blocks(
        model, _aqi_ids(model, data, side), layers=range(below), pool=_pool(data),
        batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens, interventions=(),
    )[0]  # fmt: skip
    return _mahalanobis(states, data, config)


def _pool(data: PairData) -> str:
    return data.vectors["chosen"].pool or "last"


def _aqi_ids(model: MahalsModel, data: PairData, side: str) -> list[list[int]]:
    return model.tokenizer(data.aqi_prompts[side], add_special_tokens=True)["input_ids"]


def _interval(values: Tensor, config: Phase22Config) -> dict[str, float]:
    interval = bootstrap_mean(values, n_bootstrap=config.n_bootstrap, seed=config.seed)
    return {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high}


def _mahalanobis(states: Tensor, data: PairData, config: Phase22Config) -> list[float]:
    """Per-layer mahalanobis AQI of ``states`` ``[n, layer, d]``."""
    report = evaluate_activations(
        states, data.aqi.axioms, data.aqi.labels, mode="mahalanobis", layer=list(range(states.shape[1])),
        n_bootstrap=config.aqi_bootstrap, seed=config.seed,
    )  # fmt: skip
    return list(report.overall.layer_aqi or ())


def _aqi(
    states: Tensor, prefix: list[float], data: PairData, config: Phase22Config
) -> dict[str, Any]:
    """AQI of one point: ``prefix`` (the side's unsteered layers below the first steered one)
    then the captured layers ``states`` ``[n, layer, d]`` (the last one = the model's last)."""
    curve = prefix + _mahalanobis(states, data, config)
    result: dict[str, Any] = {"mahalanobis": curve, "mahalanobis_mean": sum(curve) / len(curve)}
    if config.reference_aqi:
        reference = evaluate_activations(
            states[:, -1], data.aqi.axioms, data.aqi.labels, mode="reference", seed=config.seed
        )
        result["reference_last_layer"] = reference.overall.aqi
    return result


def _specs(points: Sequence[SweepPoint], data: PairData) -> list[Steering]:
    """One per-block :class:`Steering` per vector: block *j* carries point *j*'s ``sign·λ`` on
    its own vector and 0 on the others (``h + 0·v`` is ``h`` exactly)."""
    specs = []
    for name in dict.fromkeys(point.vector for point in points):
        alpha = tuple(
            (1.0 if p.side == "base" else -1.0) * p.lam if p.vector == name else 0.0 for p in points
        )
        specs.append(Steering(data.vectors[name], alpha=alpha, layers=points[0].layers))
    return specs


def score_group(
    points: Sequence[SweepPoint],
    data: PairData,
    config: Phase22Config,
    model: MahalsModel,
    reference: TunedReference,
    prefix_aqi: list[float],
) -> dict[str, dict[str, Any]]:
    """Every score of ``points`` (one side, the same steered layers), several λ per forward:
    each point is a row block of a per-block steer (``config.lambdas_per_forward`` points at a
    time; ``None`` = all). Writes each point's ``result.json`` and ``generations.jsonl``;
    returns ``{point name: result}``."""
    side, rows = points[0].side, data.eval_rows
    first = min(points[0].layers)
    if any(p.side != side or p.layers != points[0].layers for p in points):
        raise ValueError("score_group takes points of one side with the same steered layers")
    last = model.n_layers - 1
    tokens = {
        "chosen": scored_texts(model, data.prompts[side], [r.chosen for r in rows]),
        "rejected": scored_texts(model, data.prompts[side], [r.rejected for r in rows]),
        "neutral": neutral_texts(model, NEUTRAL_TEXTS),
        "aqi": _aqi_ids(model, data, side),
    }
    gen_ids = [tokens["aqi"][i] for i in data.generate_rows]
    sizes = {"batch_size": config.batch_size, "max_batch_tokens": config.max_batch_tokens}
    step = config.lambdas_per_forward or len(points)
    results: dict[str, dict[str, Any]] = {}
    for start in range(0, len(points), step):
        chunk = points[start : start + step]
        k = len(chunk)
        started = time.perf_counter()
        with steer(model, *_specs(chunk, data)):
            chosen = score_answers(model, tokens["chosen"], blocks=k, reference=reference.top_k,
                                   state_layer=last, **sizes)  # fmt: skip
            rejected = score_answers(model, tokens["rejected"], blocks=k, **sizes).log_prob
            neutral = score_answers(model, tokens["neutral"], blocks=k, **sizes).log_prob
            odds = score_refusal(model, gen_ids, blocks=k, **sizes)
            scored = time.perf_counter()
            judged = generate_blocks(
                model, gen_ids, blocks=k, max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size, max_batch_tokens=config.max_generate_tokens,
            )  # fmt: skip
            generated = time.perf_counter()
            states = capture_blocks(model, tokens["aqi"], layers=range(first, last + 1), pool=_pool(data),
                                    blocks=k, **sizes)  # fmt: skip
        captured = time.perf_counter()
        for j, point in enumerate(chunk):
            margins = MarginScores(chosen.log_prob[j], rejected[j])
            distance = (chosen.last_state[j] - reference.h_last).norm(dim=-1).double().mean().item()  # type: ignore[index]
            result = _result(point, data, config, margins, chosen.kl[j], perplexity_of(neutral[j], tokens["neutral"]),  # type: ignore[index]
                             odds[j], judged[j], distance, _aqi(states[j], prefix_aqi, data, config))  # fmt: skip
            _write_point(data.folder / point.name, data, judged[j], result)
            results[point.name] = result
        log.info(
            "    %s %s: %d points, scores %.1f s, generation %.1f s, capture %.1f s, AQI %.1f s",
            data.pair.key, side, k, scored - started, generated - scored, captured - generated,
            time.perf_counter() - captured,
        )  # fmt: skip
    return results


def _result(
    point: SweepPoint,
    data: PairData,
    config: Phase22Config,
    margins: MarginScores,
    kl: Tensor,
    ppl: float,
    odds: Tensor,
    judged: JudgedGenerations,
    distance: float,
    aqi: dict[str, Any],
) -> dict[str, Any]:
    unsafe = [data.aqi.labels[i] == "unsafe" for i in data.generate_rows]
    refused_unsafe = [r for r, u in zip(judged.refused, unsafe, strict=True) if u]
    refused_safe = [r for r, u in zip(judged.refused, unsafe, strict=True) if not u]
    values = odds.tolist()
    return {
        **point.to_dict(),
        "n_eval_rows": len(data.eval_rows),
        "margin": _interval(margins.margins, config),
        "accuracy": margins.accuracy,
        "margins": margins.margins.tolist(),
        "kl_tuned_steered": _interval(kl, config),
        "perplexity_neutral": ppl,
        "repetition_rate_3gram": repetition_rate(judged.token_ids, n=3),
        "refusal_unsafe": sum(refused_unsafe) / max(1, len(refused_unsafe)),
        "over_refusal_safe": sum(refused_safe) / max(1, len(refused_safe)),
        "refusal_log_odds_unsafe": _mean([o for o, u in zip(values, unsafe, strict=True) if u]),
        "refusal_log_odds_safe": _mean([o for o, u in zip(values, unsafe, strict=True) if not u]),
        "distance_to_tuned_last_layer": distance,
        "aqi": aqi,
    }


def _write_point(
    folder: Path, data: PairData, judged: JudgedGenerations, result: dict[str, Any]
) -> None:
    lines = [
        json.dumps(
            {
                "row": i,
                "label": data.aqi.labels[i],
                "prompt": data.aqi.texts[i],
                "completion": text,
                "refused": refused,
            }
        )  # fmt: skip
        for i, text, refused in zip(data.generate_rows, judged.texts, judged.refused, strict=True)
    ]
    atomic_write_text(folder / "generations.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(folder / "result.json", result)


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
