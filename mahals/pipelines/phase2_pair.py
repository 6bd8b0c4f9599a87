"""Phase 2.1 for one model pair: capture (cached), vectors, files, and the pair's JSON result.

One model at a time: load base → capture chosen, rejected → free; load tuned → capture chosen,
rejected → free (a format pair, one model on both sides, is loaded once). Each pooled
``[n, layer, d_model]`` block is cached as soon as it exists in
``<pair>/hidden_states_cache/h_{base,instruct}_{chosen,rejected}.safetensors`` (the reference
implementation's file names; ``instruct`` is the tuned side), with its identity
(:func:`mahals.pipelines.caching.cache_identity` plus role, answer and pairing rule).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mahals import plots
from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.data.hh_rlhf import PairingRule, PreferenceDataset, tokenization_mismatches
from mahals.evaluation import row_hash
from mahals.io import atomic_write_json
from mahals.models import MahalsModel
from mahals.pipelines.caching import cache_identity, cached_capture
from mahals.pipelines.console import banner
from mahals.pipelines.conversations import (
    PAIRING_RULES,
    ROLES,
    Role,
    is_format_pair,
    pair_texts,
    vector_meaning,
)
from mahals.pipelines.slot import ModelSlot
from mahals.registry import ModelPair, ModelSpec, RegistryError
from mahals.steering import ANSWERS, Answer, DifferenceSVD, PairVectors, extract_pair_vectors

if TYPE_CHECKING:
    from mahals.pipelines.phase2 import Phase2Config

__all__ = ["COSINE_DEFINITION", "NORM_DEFINITION", "extract_pair", "vector_files"]

log = logging.getLogger(__name__)

CACHE_DIR_NAME = "hidden_states_cache"
#: Cache file stem of each role (the reference implementation's layout).
CACHE_STEMS: Mapping[Role, str] = {"base": "base", "tuned": "instruct"}
EXPLAINED_VARIANCE_DIR = "explained_variances"
#: SVD components computed for the explained-variance plots (at least ``svd_component + 1``).
EXPLAINED_VARIANCE_TOP_K = 20

COSINE_DEFINITION = (
    "cos[l] = mean over samples i of cos(h_tuned[i, l], h_base[i, l]) (float64), h = the "
    "pooled hidden state at the output of decoder block l; the console's 'Mean cosine "
    "similarity' is the mean of cos[l] over layers"
)
NORM_DEFINITION = (
    "norms[l] = Euclidean norm of the steering vector's layer-l row; 'Norm of h_delta' = "
    "Frobenius norm of the whole [L, d_model] vector"
)


def vector_files(k: int) -> tuple[str, str, str]:
    """File names of the chosen, rejected and SVD-component-*k* vectors."""
    return (
        "steering_vector.safetensors",
        "steering_vector_rejected.safetensors",
        f"steering_vector_svd{k}.safetensors",
    )


@dataclass
class _PairRun:
    """State of one pair's extraction (hidden states, cache status, timings)."""

    pair: ModelPair
    rule: PairingRule
    config: Phase2Config
    folder: Path
    states: dict[tuple[Role, Answer], Tensor] = field(default_factory=dict)
    cache_status: dict[str, str] = field(default_factory=dict)
    tokenization_mismatches: int | None = None
    dtype_device: dict[str, str] = field(default_factory=dict)
    capture_seconds: float = 0.0
    row_hashes: list[str] = field(default_factory=list)

    @property
    def cache_dir(self) -> Path:
        return self.folder / CACHE_DIR_NAME

    def spec(self, role: Role) -> ModelSpec:
        return self.pair.base if role == "base" else self.pair.tuned

    def role_label(self, role: Role) -> str:
        """``BASE model`` / ``INSTRUCT model`` / ``TUNED (dpo) model`` (the reference
        implementation's headings); under the 'native' rule with the format read, and for a
        format pair (one model) the side rather than a model."""
        if is_format_pair(self.pair):
            return {"base": "BASE side (plain transcript)", "tuned": "TUNED side (chat template)"}[
                role
            ]
        if role == "base":
            label = "BASE model"
        elif self.pair.tuning == "instruct":
            label = "INSTRUCT model"
        else:
            label = f"TUNED ({self.pair.tuning}) model"
        if self.rule == "native":
            label += " (plain transcript)" if role == "base" else " (chat template)"
        return label

    def batch_size(self, role: Role) -> int:
        return self.config.batch_size or self.spec(role).batch_size


def _count_tokenization_mismatches(
    run: _PairRun, base: MahalsModel, texts: Sequence[str], tuned_tokenizer: Callable[[], Any]
) -> dict[str, str]:
    """Under a shared rule, count (once) the texts the base and tuned tokenizers split
    differently; returns the count as cache metadata."""
    shared_rule = run.rule != "native" and not is_format_pair(run.pair)
    if run.tokenization_mismatches is None and shared_rule:
        mismatched = tokenization_mismatches(texts, base.tokenizer, tuned_tokenizer())
        run.tokenization_mismatches = len(mismatched)
        if mismatched:
            log.warning(
                "  WARNING: the base and tuned tokenizers split %d of %d texts differently: "
                "those samples do not give both models the same tokens",
                len(mismatched),
                len(texts),
            )
    if run.tokenization_mismatches is None:
        return {}
    return {"tokenization_mismatches": str(run.tokenization_mismatches)}


def _capture_all(
    run: _PairRun,
    slot: ModelSlot,
    texts: Mapping[tuple[Role, Answer], list[str]],
    tuned_tokenizer: Callable[[], Any],
) -> None:
    """Fill ``run.states`` role by role, from the cache or one forward pass per text list;
    the model of a role is freed before the next role's is loaded."""
    config = run.config
    base_texts = texts["base", "chosen"] + texts["base", "rejected"]
    steps = [(role, answer) for role in ROLES for answer in ANSWERS]
    for step, (role, answer) in enumerate(steps, start=1):
        label = run.role_label(role)
        log.info("[%d/4] %s - %s responses...", step, label, answer)
        path = run.cache_dir / f"h_{CACHE_STEMS[role]}_{answer}.safetensors"
        spec = run.spec(role)

        def before_capture(model: MahalsModel, role: Role = role) -> dict[str, str]:
            if role != "base":
                return {}
            return _count_tokenization_mismatches(run, model, base_texts, tuned_tokenizer)

        block = cached_capture(
            path,
            cache_identity(
                spec, config.pool, texts[role, answer], role=role, answer=answer, pairing=run.rule
            ),
            texts[role, answer],
            lambda spec=spec, label=label: slot.get(spec, announce=label),
            pool=config.pool,
            batch_size=run.batch_size(role),
            max_batch_tokens=config.max_batch_tokens,
            use_cache=config.use_cache,
            progress=config.progress,
            before_capture=before_capture,
        )
        run.states[role, answer] = block.tensor
        run.cache_status[path.name] = "reused" if block.reused else "computed"
        run.capture_seconds += block.seconds
        if block.reused:
            if "tokenization_mismatches" in block.metadata:
                run.tokenization_mismatches = int(block.metadata["tokenization_mismatches"])
            log.info("  Reusing cached hidden states: %s", path.relative_to(run.folder))
        else:
            run.dtype_device[role] = block.model or ""
        if answer == ANSWERS[-1] and not (role == "base" and is_format_pair(run.pair)):
            slot.release()  # a format pair keeps its one model for the other side


def _compute_vectors(run: _PairRun, meaning: str) -> PairVectors:
    """The pair's vectors and statistics (:func:`extract_pair_vectors`), logged as the
    reference implementation prints them."""
    config, pair = run.config, run.pair
    h_base = {answer: run.states["base", answer] for answer in ANSWERS}
    h_tuned = {answer: run.states["tuned", answer] for answer in ANSWERS}
    try:
        vectors = extract_pair_vectors(
            h_base,
            h_tuned,
            svd_component=config.svd_component,
            n_explained=EXPLAINED_VARIANCE_TOP_K,
            dataset=config.dataset_label,
            meaning=meaning,
            base_model=pair.base.source,
            tuned_model=pair.tuned.source,
            pool=config.pool,
            extra={
                "pair": pair.key,
                "tuning": pair.tuning,
                "pairing": run.rule,
                # Phase 2.2 refuses to evaluate a vector on the rows it was extracted from.
                "row_sha256": run.row_hashes,
            },
        )
    except ValueError as error:
        raise RuntimeError(f"pair {pair.key}: {error}") from error
    k = config.svd_component
    log.info("Hidden states shape: %s", h_base["chosen"].shape)
    log.info("\nShape of h_delta (chosen): %s", vectors.chosen.vectors.shape)
    log.info("Norm of h_delta (chosen): %.4f", vectors.frobenius_norm)
    log.info("\nApplying SVD decomposition (component %d, centered differences)...", k)
    log.info("SVD steering vector shape: %s", vectors.svd.vectors.shape)
    if vectors.svd_null_layers:
        log.warning(
            "  WARNING: component %d is below the numerical rank of the centered differences "
            "at layers %s (the samples barely differ there): those rows are zero",
            k,
            vectors.svd_null_layers,
        )
    return vectors


def _floats(values: Tensor) -> list[float]:
    return [float(v) for v in values.detach().cpu().to(torch.float64)]


def _pair_result(
    run: _PairRun, vectors: PairVectors, meaning: str, data_record: Mapping[str, Any]
) -> dict[str, Any]:
    """The pair's small JSON result (checkpoint and summary): no tensors, no timings."""
    pair, k = run.pair, run.config.svd_component
    n_layers, d_model = vectors.chosen.vectors.shape
    return {
        "pair": pair.key,
        "display_name": pair.display_name,
        "base_model": pair.base.source,
        "tuned_model": pair.tuned.source,
        "tuning": pair.tuning,
        "pairing": run.rule,
        "vector_meaning": meaning,
        "n_layers": int(n_layers),
        "d_model": int(d_model),
        "n_samples": vectors.chosen.n_samples,
        "pool": run.config.pool,
        "cosine_chosen_mean": float(vectors.cosines["chosen"].mean()),
        "cosine_rejected_mean": float(vectors.cosines["rejected"].mean()),
        "cosine_chosen": _floats(vectors.cosines["chosen"]),
        "cosine_rejected": _floats(vectors.cosines["rejected"]),
        "norm_chosen": vectors.frobenius_norm,
        "norms_chosen": _floats(vectors.chosen.norms()),
        "norms_rejected": _floats(vectors.rejected.norms()),
        "svd_component": k,
        "svd_explained_variance": _floats(vectors.centered.explained_variance_ratio[:, k]),
        "svd_component_null_layers": vectors.svd_null_layers,
        "dsteer_singular_value_ratio": _floats(vectors.dsteer.singular_value_ratio),
        "dsteer_top_direction_alignment": _floats(vectors.dsteer.top_direction_alignment),
        "tokenization_mismatches": run.tokenization_mismatches,
        "data": dict(data_record),
        "files": {
            name.removesuffix(".safetensors"): f"{pair.key}/{name}" for name in vector_files(k)
        },
    }


def _save_pair_plots(
    folder: Path,
    display: str,
    cosines: Mapping[str, Tensor],
    norms: Mapping[str, Tensor],
    centered: DifferenceSVD,
) -> None:
    """``cosine_similarity.png``, ``steering_vector_norms.png`` (chosen and rejected curves) and
    one explained-variance plot per layer of the centered chosen differences."""
    curves = (
        (cosines, "cos(h_tuned, h_base)", "mean cosine similarity", "cosine_similarity.png"),
        (norms, "steering-vector L2 norm", "L2 norm of mean(h_tuned - h_base)",
         "steering_vector_norms.png"),
    )  # fmt: skip
    for values, quantity, ylabel, name in curves:
        plots.layer_curves_comparison(
            dict(values),
            title=f"{display}: {quantity} per layer",
            ylabel=ylabel,
            relative_depth=False,
            path=folder / name,
        )
    plots.explained_variance_plots(
        centered.explained_variance_ratio,
        centered.layers,
        folder / EXPLAINED_VARIANCE_DIR,
        top_k=EXPLAINED_VARIANCE_TOP_K,
        title=f"{display}: explained variance of centered differences",
    )


def extract_pair(
    pair: ModelPair,
    config: Phase2Config,
    conversations: Callable[[], tuple[PreferenceDataset, dict[str, Any]]],
    slot: ModelSlot,
    tokenizer_loader: Callable[[ModelSpec], Any],
) -> dict[str, Any]:
    """Extract, save and summarise one pair; returns its JSON result for the checkpoint."""
    started_at, started = utc_timestamp(), time.perf_counter()
    if pair.pairing is not None and pair.pairing not in PAIRING_RULES:
        raise RegistryError(
            f"pair {pair.key!r} has pairing {pair.pairing!r}; expected one of {PAIRING_RULES}"
        )
    rule: PairingRule = pair.pairing or config.pairing  # type: ignore[assignment]
    run = _PairRun(pair=pair, rule=rule, config=config, folder=config.out_dir / pair.key)
    meaning = vector_meaning(pair, rule)
    dataset, data_record = conversations()  # logged once, before the first pair's banner
    tuned_label = "Instruct:" if pair.tuning == "instruct" else f"Tuned ({pair.tuning}):"
    banner(
        log,
        f"Extracting: {pair.display_name}",
        f"  Base:     {pair.base.source}",
        f"  {tuned_label:<{max(10, len(tuned_label) + 1)}}{pair.tuned.source}",
        f"  Pairing:  {rule}" + (" (the pair's own rule)" if pair.pairing else ""),
    )
    if is_format_pair(pair) or rule == "native":
        log.info("NOTE: %s.", meaning)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    tokenizers: list[Any] = []

    def tuned_tokenizer() -> Any:
        if not tokenizers:
            tokenizers.append(tokenizer_loader(pair.tuned))
        return tokenizers[0]

    texts = pair_texts(dataset, rule, tuned_tokenizer)
    run.row_hashes = [row_hash(row) for row in dataset]
    n_samples = len(dataset)
    base_batch, tuned_batch = run.batch_size("base"), run.batch_size("tuned")
    batch_text = (
        str(base_batch) if base_batch == tuned_batch else f"base {base_batch} / tuned {tuned_batch}"
    )
    log.info("\nExtracting hidden states from %d samples (batch_size=%s)...", n_samples, batch_text)
    log.info("  Prepared %d chosen + %d rejected texts", n_samples, n_samples)
    load_seconds = slot.load_seconds
    try:
        _capture_all(run, slot, texts, tuned_tokenizer)
    finally:
        slot.release()
    if config.use_cache and "computed" in run.cache_status.values():
        log.info("\nHidden states cached in %s", run.cache_dir)

    vectors = _compute_vectors(run, meaning)
    for vector, name in zip(
        (vectors.chosen, vectors.rejected, vectors.svd),
        vector_files(config.svd_component),
        strict=True,
    ):
        vector.save(run.folder / name)
    plots_started = time.perf_counter()
    _save_pair_plots(
        run.folder,
        pair.display_name,
        vectors.cosines,
        {"chosen": vectors.chosen.norms(), "rejected": vectors.rejected.norms()},
        vectors.centered,
    )
    plot_seconds = time.perf_counter() - plots_started
    log.info("\nSteering vector saved: %s", run.folder)
    for answer in ANSWERS:
        log.info("Mean cosine similarity (%s): %.4f", answer, float(vectors.cosines[answer].mean()))

    result = _pair_result(run, vectors, meaning, data_record)
    centered = vectors.centered
    metadata = {
        **result,
        "settings": config.settings(),
        "definitions": {"cosine": COSINE_DEFINITION, "norms": NORM_DEFINITION},
        "explained_variance_top": {
            str(layer): _floats(centered.explained_variance_ratio[row, :EXPLAINED_VARIANCE_TOP_K])
            for row, layer in enumerate(centered.layers)
        },
        "svd_method": centered.method,
        "batch_size": {"base": base_batch, "tuned": tuned_batch},
        "model_dtype_device": run.dtype_device,
        "cache": run.cache_status if config.use_cache else "disabled",
        "started": started_at,
        "finished": utc_timestamp(),
        "seconds": {
            "total": round(time.perf_counter() - started, 3),
            "model_loading": round(slot.load_seconds - load_seconds, 3),
            "capture": round(run.capture_seconds, 3),
            "plots": round(plot_seconds, 3),
        },
        "peak_gpu_memory_gb": (
            round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None
        ),
        "mahals_version": __version__,
    }
    atomic_write_json(run.folder / "metadata.json", metadata)
    return result
