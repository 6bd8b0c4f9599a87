"""A genuine aligned pair that runs offline: DPO with LoRA on hh-rlhf, merging, and checks.

The study's D-STEER pair (Tulu SFT → DPO) was made by DPO on preference data; this module makes
a small one the same way and ships it: SmolLM2-135M-Instruct (base) and the same model with a
LoRA adapter trained by DPO on hh-rlhf harmless-base rows (tuned).

- :func:`train_dpo` (CLI ``mahals pair dpo --recipe R --out DIR``) trains the adapter with
  ``trl``'s ``DPOTrainer`` and ``peft`` (the optional extra ``mahals[dpo]``), with every setting
  in a :class:`DPORecipe` JSON file, deterministic for a seed, reference log-probabilities
  precomputed, gradient checkpointing off. It writes the adapter (safetensors, in the recipe's
  storage dtype), the recipe, the row splits, and ``training.json`` (mahals and library versions,
  SHA-256 of the training rows, the training curve, timings), plus the curve as a PNG.
- Row discipline: the shipped hh-rlhf rows are split by :func:`mahals.data.splits.split_rows`
  into ``dpo_train`` / ``vector_extraction`` / ``evaluation``; training reads only the first,
  and :func:`evaluate_pair` refuses rows of the other two uses.
- :func:`merge_lora` merges a LoRA adapter (local folder, ``package:`` path or hub id) into a
  ``transformers`` model without needing ``peft``: ``W ← W + (α/r) · B A`` per adapted linear
  layer, computed in float32.
- :func:`preference_margins`, :func:`completion_kl` and :func:`evaluate_pair` check the pair:
  preference accuracy and mean margin ``log p(chosen) − log p(rejected)`` on held-out rows for
  both sides, with bootstrap confidence intervals, and the KL between the two sides.

Token convention (shared with ``trl``): the prompt is the tokenizer's chat template over the
prompt turns with its generation prompt (:func:`mahals.data.format_conversation`), the answer is
appended verbatim followed by the EOS token, and the answer's tokens are those after the longest
common prefix of the tokenised prompt and the tokenised prompt + answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from mahals._version import __version__
from mahals.data.hh_rlhf import PreferencePair, format_conversation, load_hh_rlhf
from mahals.data.splits import (
    RowSplits,
    assert_disjoint,
    load_row_splits,
    row_hash,
    rows_sha256,
    split_rows,
)
from mahals.io import atomic_write_bytes, atomic_write_json, save_tensors
from mahals.registry import ModelPair, resolve_resource

__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_CONFIG_FILE",
    "DPORecipe",
    "DPOResult",
    "LoraSettings",
    "PairEvaluation",
    "PreferenceTokens",
    "answer_log_probs",
    "bootstrap_interval",
    "completion_kl",
    "evaluate_pair",
    "evaluation_rows",
    "load_recipe",
    "merge_lora",
    "pair_row_splits",
    "preference_margins",
    "preference_token_ids",
    "select_rows",
    "train_dpo",
    "add_arguments",
    "main",
    "run_from_args",
]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
RECIPE_FILE = "recipe.json"
TRAINING_FILE = "training.json"
ROW_SPLITS_FILE = "row_splits.json"
CURVE_JSON_FILE = "training_curve.json"
CURVE_PNG_FILE = "training_curve.png"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------ recipe


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape: rank ``r``, scale ``alpha`` (the update is ``alpha / r · B A``), dropout,
    and the names of the linear layers it adapts (e.g. ``q_proj``)."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0


@dataclass(frozen=True)
class DPORecipe:
    """Every setting of a DPO-LoRA run (one JSON file; see ``recipes/smollm2_dpo_demo.json``).

    Attributes:
        name: what the adapter is called in its metadata.
        base: registry key (or hub id / local path) of the model tuned.
        data: hh-rlhf jsonl(.gz) file, relative to the data folder (``--data``) unless absolute.
        split_seed, split_fractions: the row splits (:func:`mahals.data.splits.split_rows`).
        rows: training rows, the first ones of the ``dpo_train`` split whose prompt + longer
            answer fits in ``max_length`` tokens.
        max_length: tokens per sequence (prompt + answer + EOS); longer rows are skipped, never
            truncated.
        lora: :class:`LoraSettings`.
        beta: DPO's β (strength of the tie to the reference model).
        learning_rate, lr_scheduler, warmup_ratio, epochs, batch_size,
        gradient_accumulation_steps: the optimiser schedule (AdamW); the effective batch is
            ``batch_size · gradient_accumulation_steps`` preference pairs.
        seed: seeds LoRA initialisation and data order.
        adapter_dtype: storage dtype of the saved adapter ("float16", "bfloat16", "float32").
    """

    name: str
    base: str
    data: str
    rows: int
    max_length: int
    lora: LoraSettings
    beta: float
    learning_rate: float
    epochs: int
    batch_size: int
    seed: int
    split_seed: int = 0
    split_fractions: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"dpo_train": 0.5, "vector_extraction": 0.25, "evaluation": 0.25}
    )
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    adapter_dtype: str = "float16"

    def __post_init__(self) -> None:
        problems = []
        if self.adapter_dtype not in _DTYPES:
            problems.append(f"adapter_dtype {self.adapter_dtype!r} is not one of {list(_DTYPES)}")
        for name in ("rows", "max_length", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("beta", "learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora.r < 1 or not self.lora.target_modules:
            problems.append("lora needs r >= 1 and at least one target module")
        if "dpo_train" not in self.split_fractions:
            problems.append(
                f"split_fractions has no 'dpo_train' split: {dict(self.split_fractions)}"
            )
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        data["split_fractions"] = dict(self.split_fractions)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str = "recipe") -> DPORecipe:
        """Build from parsed JSON; unknown or missing keys raise naming them and ``origin``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{origin}: unknown recipe keys {unknown}; known: {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{origin}: recipe keys missing: {missing}")
        lora = dict(data["lora"])
        lora_fields = {f.name for f in dataclasses.fields(LoraSettings)}
        unknown_lora = sorted(set(lora) - lora_fields)
        if unknown_lora:
            raise ValueError(
                f"{origin}: unknown lora keys {unknown_lora}; known: {sorted(lora_fields)}"
            )
        try:
            lora["target_modules"] = tuple(lora["target_modules"])
            settings = LoraSettings(**_ints_as_floats(LoraSettings, lora))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{origin}: lora: {err}") from err
        return cls(**{**_ints_as_floats(cls, data), "lora": settings})


def _ints_as_floats(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """JSON writes 32 for 32.0: integers given for float fields become floats."""
    floats = {f.name for f in dataclasses.fields(cls) if f.type == "float"}
    return {
        key: float(value) if key in floats and type(value) is int else value
        for key, value in data.items()
    }


def load_recipe(path: str | os.PathLike) -> DPORecipe:
    """Read a :class:`DPORecipe` from a JSON file (errors name the file and the bad key)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return DPORecipe.from_json(data, str(path))


# ------------------------------------------------------------------------------ tokenisation


@dataclass(frozen=True)
class PreferenceTokens:
    """Token ids of one row: the prompt, and each answer's tokens that follow it (EOS included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def longest(self) -> int:
        """Tokens in the longer of prompt + chosen and prompt + rejected."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def preference_token_ids(pair: PreferencePair, tokenizer: Any) -> PreferenceTokens:
    """The row's tokens under the module's convention (the one ``trl``'s DPOTrainer applies to
    a prompt string and two answer strings): prompt = chat template with generation prompt,
    answer = its text + EOS, split at the longest common prefix."""
    prompt_text = format_conversation(pair, None, tokenizer)
    eos = tokenizer.eos_token or ""
    prompt = tokenizer(prompt_text)["input_ids"]
    full = {
        which: tokenizer(prompt_text + pair.answer(which) + eos)["input_ids"]
        for which in ("chosen", "rejected")
    }
    cut = min(_common_prefix(prompt, ids) for ids in full.values())
    return PreferenceTokens(
        list(prompt[:cut]), list(full["chosen"][cut:]), list(full["rejected"][cut:])
    )


def select_rows(
    splits: RowSplits,
    dataset: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    split: str,
    rows: int,
    max_length: int,
) -> tuple[list[PreferencePair], int]:
    """The first ``rows`` rows of ``split`` (in the split's seeded order) that fit in
    ``max_length`` tokens, and how many rows were skipped as too long on the way.

    Raises ``ValueError`` when the split has fewer rows that fit.
    """
    chosen_rows, skipped = [], 0
    for pair in splits.select(dataset, split):
        if preference_token_ids(pair, tokenizer).longest <= max_length:
            chosen_rows.append(pair)
            if len(chosen_rows) == rows:
                return chosen_rows, skipped
        else:
            skipped += 1
    raise ValueError(
        f"split {split!r} has only {len(chosen_rows)} rows of at most {max_length} tokens "
        f"({skipped} longer ones skipped); asked for {rows}"
    )


# ------------------------------------------------------------------------------------ merging


_UNSUPPORTED_LORA = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "lora_bias": "LoRA biases",
    "layer_replication": "layer replication",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "adapted parameters (target_parameters)",
}


def _adapter_folder(adapter: str | os.PathLike) -> Path:
    location = resolve_resource(adapter)
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(location)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"LoRA adapter {os.fspath(adapter)!r}: no such directory ({path}) and not a hub id"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=[ADAPTER_FILE, ADAPTER_CONFIG_FILE]))


def merge_lora(hf_model: torch.nn.Module, adapter: str | os.PathLike) -> torch.nn.Module:
    """Merge a LoRA adapter into ``hf_model`` in place and return it.

    ``adapter`` is a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``
    (the layout ``peft`` saves), ``package:<path>`` inside the mahals package, or a hub id
    (downloaded with ``huggingface_hub``). Each adapted linear layer gets
    ``W ← W + s · B A`` with ``s = lora_alpha / r`` (``/ √r`` with rsLoRA), computed in float32
    and cast to the layer's dtype. Adapters using features beyond plain LoRA (DoRA, biases,
    per-layer ranks, …) are refused with the feature named. ``peft`` is not needed.
    """
    folder = _adapter_folder(adapter)
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"LoRA adapter {folder}: {needed.name} is missing")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    used = [label for key, label in _UNSUPPORTED_LORA.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise ValueError(
            f"{config_path}: merge_lora supports plain LoRA only; this adapter uses {used}"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)

    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        module_name, dot, factor = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if not dot or factor not in ("A.weight", "B.weight"):
            raise ValueError(
                f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights)"
            )
        factors.setdefault(module_name, {})[factor[0]] = tensor
    modules = dict(hf_model.named_modules())
    with torch.no_grad():
        for module_name, pair in sorted(factors.items()):
            module = modules.get(module_name)
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(
                    f"{weights_path}: adapter targets {module_name!r}, which is "
                    f"{'missing from' if module is None else 'not a Linear layer of'} the model"
                )
            if set(pair) != {"A", "B"}:
                raise ValueError(
                    f"{weights_path}: {module_name!r} lacks lora_{({'A', 'B'} - set(pair)).pop()}"
                )
            delta = scaling * (pair["B"].float() @ pair["A"].float())
            if delta.shape != module.weight.shape:
                raise ValueError(
                    f"{weights_path}: update for {module_name!r} is {tuple(delta.shape)}, the layer "
                    f"is {tuple(module.weight.shape)} (adapter made for another model?)"
                )
            merged = module.weight.float() + delta.to(module.weight.device)
            module.weight.copy_(merged.to(module.weight.dtype))
    logger.info(
        "merged LoRA %s into %d layers (r=%d, scale %.3g)", folder, len(factors), rank, scaling
    )
    return hf_model


# ---------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DPOResult:
    """What :func:`train_dpo` wrote and measured.

    Attributes:
        out: the adapter folder.
        training_rows_sha256: :func:`mahals.data.splits.rows_sha256` of the training rows.
        n_rows: training rows; ``n_skipped_too_long`` rows of the split skipped on the way.
        seconds: wall time of the reference pass + training; ``total_seconds`` of the whole call.
        curve: one dict per logged optimiser step (loss, rewards/margins, rewards/accuracies …).
    """

    out: Path
    training_rows_sha256: str
    n_rows: int
    n_skipped_too_long: int
    seconds: float
    total_seconds: float
    curve: list[dict[str, float]]


def _library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"mahals": __version__}
    for package in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _find_data(data: str, data_root: str | os.PathLike | None) -> Path:
    """``data`` itself when absolute, else below ``data_root`` or a ``shared/data`` folder."""
    path = Path(data)
    if path.is_absolute():
        candidates = [path]
    elif data_root is not None:
        candidates = [Path(data_root) / path]
    else:
        checkout = Path(__file__).resolve().parents[2]
        candidates = [
            Path.cwd() / ".." / "shared" / "data" / path,
            checkout / "shared" / "data" / path,
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"recipe data {data!r} not found at {', '.join(map(str, candidates))}; pass --data FOLDER"
    )


def _plot_curve(curve: list[dict[str, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    left.plot(steps, [entry.get("loss", float("nan")) for entry in curve], color="tab:blue")
    left.axhline(math.log(2), color="grey", lw=0.8, ls="--", label="log 2 (no preference)")
    left.set(xlabel="optimiser step", ylabel="DPO loss")
    left.legend(fontsize=7)
    right.plot(
        steps, [entry.get("rewards/margins", float("nan")) for entry in curve], color="tab:green"
    )
    right.set(xlabel="optimiser step", ylabel="reward margin β·Δlog-ratio")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def train_dpo(
    recipe: DPORecipe,
    out: str | os.PathLike,
    *,
    model: Any = None,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> DPOResult:
    """Train a LoRA adapter on ``recipe.base`` with DPO and write it to ``out``.

    Args:
        recipe: every training setting (:func:`load_recipe`).
        out: folder for the adapter (created; existing files of the same names are replaced).
        model: a :class:`mahals.MahalsModel` to tune instead of loading ``recipe.base`` (its
            weights are left unchanged: the LoRA layers are removed after training).
        data_root: folder the recipe's ``data`` path is relative to (default: ``shared/data``).
        device: where to train (default: CUDA when available); training is float32.

    Writes ``adapter_model.safetensors`` (+ ``adapter_config.json``, loadable by
    :func:`merge_lora` and ``peft``), ``recipe.json``, ``row_splits.json``, ``training.json``,
    ``training_curve.json`` and ``training_curve.png``. Needs ``pip install 'mahals[dpo]'``.
    """
    try:
        import datasets
        from peft import LoraConfig, get_peft_model_state_dict
        from trl import DPOConfig, DPOTrainer
    except ImportError as err:
        raise ImportError(
            f"DPO training needs trl and peft: pip install 'mahals[dpo]' ({err})"
        ) from err
    from mahals.models import default_device, load_model

    started = time.perf_counter()
    out = Path(out)
    device = torch.device(device) if device is not None else default_device()
    if model is None:
        model = load_model(recipe.base, device=device, dtype=torch.float32, verbose=False)
    hf_model, tokenizer = model.hf, model.tokenizer
    data_path = _find_data(recipe.data, data_root)
    dataset = load_hh_rlhf(data_path, verbose=False)
    splits = split_rows(
        dataset,
        recipe.split_fractions,
        seed=recipe.split_seed,
        source=f"{recipe.data} ({dataset.drops.summary()})",
    )
    rows, skipped = select_rows(
        splits, dataset.pairs, tokenizer, split="dpo_train", rows=recipe.rows,
        max_length=recipe.max_length,
    )  # fmt: skip
    assert_disjoint(rows, splits.all_except("dpo_train"), what="DPO training rows")
    training_sha = rows_sha256(rows)
    logger.info("%d training rows (%d longer than %d tokens skipped), sha256 %s",
                len(rows), skipped, recipe.max_length, training_sha)  # fmt: skip
    train_set = datasets.Dataset.from_list(
        [
            {
                "prompt": format_conversation(pair, None, tokenizer),
                "chosen": pair.chosen,
                "rejected": pair.rejected,
            }
            for pair in rows
        ]
    )
    lora = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory(prefix="mahals-dpo-") as scratch:
        config = DPOConfig(
            output_dir=scratch,
            beta=recipe.beta,
            learning_rate=recipe.learning_rate,
            lr_scheduler_type=recipe.lr_scheduler,
            warmup_steps=recipe.warmup_ratio,  # a float below 1 is a fraction of the steps
            num_train_epochs=recipe.epochs,
            per_device_train_batch_size=recipe.batch_size,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps,
            max_length=recipe.max_length,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=recipe.batch_size,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            seed=recipe.seed,
            data_seed=recipe.seed,
            use_cpu=device.type == "cpu",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        # trl patches the instance's ``forward`` (a fused LM head closing over the original
        # module); it is put back afterwards so the caller's model (and its nnsight wrapper)
        # behaves as before, and copies of it do not call into this instance.
        own_forward = hf_model.__dict__.get("forward")
        train_start = time.perf_counter()
        try:
            trainer = DPOTrainer(
                model=hf_model,
                args=config,
                train_dataset=train_set,
                processing_class=tokenizer,
                peft_config=lora,
            )
            trainer.train()
            seconds = time.perf_counter() - train_start
            peft_model = trainer.model
            state = {
                k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()
            }
            adapter_config = peft_model.peft_config["default"].to_dict()
            peft_model.unload()  # the caller's model without LoRA layers
        finally:
            if own_forward is None:
                hf_model.__dict__.pop("forward", None)
            else:
                hf_model.forward = own_forward
    curve = [
        {key: float(value) for key, value in entry.items() if isinstance(value, int | float)}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    for entry in adapter_config:
        if isinstance(adapter_config[entry], set):
            adapter_config[entry] = sorted(adapter_config[entry])
    adapter_config["base_model_name_or_path"] = recipe.base
    storage = _DTYPES[recipe.adapter_dtype]
    save_tensors(
        out / ADAPTER_FILE,
        {key: tensor.to(storage) for key, tensor in state.items()},
        metadata={"format": "pt", "mahals_version": __version__, "recipe": recipe.name},
    )
    atomic_write_json(out / ADAPTER_CONFIG_FILE, _jsonable(adapter_config))
    atomic_write_json(out / RECIPE_FILE, recipe.to_json())
    splits.save(out / ROW_SPLITS_FILE)
    atomic_write_json(out / CURVE_JSON_FILE, curve)
    atomic_write_bytes(
        out / CURVE_PNG_FILE, _plot_curve(curve, f"{recipe.name}: DPO on {len(rows)} rows")
    )
    total = time.perf_counter() - started
    atomic_write_json(
        out / TRAINING_FILE,
        {
            "name": recipe.name,
            "versions": _library_versions(),
            "recipe": recipe.to_json(),
            "data_file": data_path.name,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "n_training_rows": len(rows),
            "n_skipped_too_long": skipped,
            "training_rows_sha256": training_sha,
            "training_row_hashes": [row_hash(pair) for pair in rows],
            "row_splits": {
                "file": ROW_SPLITS_FILE,
                "seed": splits.seed,
                "sizes": {k: len(v) for k, v in splits.hashes.items()},
            },  # fmt: skip
            "trainable_parameters": int(sum(t.numel() for t in state.values())),
            "train_seconds": round(seconds, 2),
            "total_seconds": round(total, 2),
            "final": curve[-1] if curve else {},
            "curve": {"json": CURVE_JSON_FILE, "png": CURVE_PNG_FILE},
        },
    )
    return DPOResult(out, training_sha, len(rows), skipped, seconds, total, curve)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# -------------------------------------------------------------------------------- evaluation


def _completion_log_softmax(
    model: torch.nn.Module, tokenizer: Any, sequences: Sequence[tuple[list[int], list[int]]]
) -> list[Tensor]:
    """For each (prompt ids, completion ids): the float32 log-softmax over the vocabulary at the
    positions that predict the completion's tokens (``[len(completion), vocab]``), from one
    batched forward pass.

    Sequences are left-padded with explicit position ids, so that only the last positions'
    logits are computed (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) + len(c) for p, c in sequences)
    keep = max(len(c) for _, c in sequences) + 1
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        tokens = prompt + completion
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
    log_probs = logits[:, :-1].float().log_softmax(-1)
    return [log_probs[row, keep - 1 - len(c) :] for row, (_, c) in enumerate(sequences)]


def _summed(log_probs: Float[Tensor, "completion vocab"], completion: list[int]) -> float:
    index = torch.tensor(completion, device=log_probs.device)[:, None]
    return log_probs.gather(-1, index).double().sum().item()


def _score_rows(
    models: Sequence[torch.nn.Module],
    tokenizer: Any,
    rows: Sequence[PreferencePair],
    batch_size: int,
) -> tuple[Float[Tensor, "model row answer"], Float[Tensor, " row"] | None]:
    """Summed log-probs of (chosen, rejected) per row under each model, and, for two models,
    the mean per-token KL(models[1] ‖ models[0]) over each row's chosen answer; the models run
    batch by batch in lockstep so no distribution is kept longer than one batch."""
    tokens = [preference_token_ids(pair, tokenizer) for pair in rows]
    sums = torch.zeros((len(models), len(rows), 2), dtype=torch.float64)
    kl = torch.zeros(len(rows), dtype=torch.float64) if len(models) == 2 else None
    for start in range(0, len(rows), batch_size):
        batch = tokens[start : start + batch_size]
        sequences = [(t.prompt, t.chosen) for t in batch] + [(t.prompt, t.rejected) for t in batch]
        chosen_log_probs = []
        for m, model in enumerate(models):
            log_probs = _completion_log_softmax(model, tokenizer, sequences)
            for offset, t in enumerate(batch):
                sums[m, start + offset, 0] = _summed(log_probs[offset], t.chosen)
                sums[m, start + offset, 1] = _summed(log_probs[len(batch) + offset], t.rejected)
            chosen_log_probs.append(log_probs[: len(batch)])
        if kl is not None:
            for offset, (base_lp, tuned_lp) in enumerate(zip(*chosen_log_probs, strict=True)):
                per_token = (tuned_lp.exp() * (tuned_lp - base_lp)).sum(-1)
                kl[start + offset] = per_token.double().mean()
    return sums, kl


def answer_log_probs(
    model_hf: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[PreferencePair],
    *,
    batch_size: int = 4,
) -> Float[Tensor, "row answer"]:
    """``log p(answer | prompt)`` in nats, summed over the answer's tokens (EOS included), for
    the chosen (column 0) and rejected (column 1) answer of every row (float64)."""
    return _score_rows([model_hf], tokenizer, rows, batch_size)[0][0]


def preference_margins(
    model_hf: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[PreferencePair],
    *,
    batch_size: int = 4,
) -> Float[Tensor, " row"]:
    """Per-row preference margin ``log p(chosen | prompt) − log p(rejected | prompt)`` in nats
    (float64; see the module's token convention)."""
    sums = answer_log_probs(model_hf, tokenizer, rows, batch_size=batch_size)
    return sums[:, 0] - sums[:, 1]


def completion_kl(
    tuned_hf: torch.nn.Module,
    base_hf: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[PreferencePair],
    *,
    batch_size: int = 4,
) -> Float[Tensor, " row"]:
    """Per-row mean KL(tuned ‖ base) of the next-token distributions over the chosen answer's
    tokens (teacher-forced), in nats per token."""
    _, kl = _score_rows([base_hf, tuned_hf], tokenizer, rows, batch_size)
    return cast(Tensor, kl)  # two models: the KL is always computed


def bootstrap_interval(
    values: np.ndarray | Tensor,
    statistic: Any = np.mean,
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic, lower, upper): percentile bootstrap interval of ``statistic`` over rows."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(n_resamples, len(values)))
    resampled = np.array([statistic(values[d]) for d in draws])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(statistic(values)), float(low), float(high)


@dataclass(frozen=True)
class PairEvaluation:
    """Base vs tuned on held-out rows; every statistic is (value, CI low, CI high), 95 %.

    ``accuracy``: share of rows with margin > 0; ``margin``: mean margin (nats);
    ``*_gain``: tuned − base, paired per row; ``kl``: mean per-token KL(tuned ‖ base) on the
    chosen answers (nats/token).
    """

    n_rows: int
    base_accuracy: tuple[float, float, float]
    tuned_accuracy: tuple[float, float, float]
    base_margin: tuple[float, float, float]
    tuned_margin: tuple[float, float, float]
    accuracy_gain: tuple[float, float, float]
    margin_gain: tuple[float, float, float]
    kl: tuple[float, float, float]
    rows_sha256: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_pair(
    base_hf: torch.nn.Module,
    tuned_hf: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[PreferencePair],
    *,
    forbidden_hashes: Iterable[str] = frozenset(),
    batch_size: int = 4,
    seed: int = 0,
) -> PairEvaluation:
    """Preference accuracy, mean margin and KL of both sides on ``rows``, with bootstrap CIs.

    ``forbidden_hashes`` are the rows the pair was built from (e.g.
    ``splits.all_except("evaluation")``): evaluating on any of them raises
    :class:`mahals.data.splits.RowOverlapError`.
    """
    assert_disjoint(rows, forbidden_hashes, what="pair evaluation rows")
    sums, per_row_kl = _score_rows([base_hf, tuned_hf], tokenizer, rows, batch_size)
    base, tuned = (sums[:, :, 0] - sums[:, :, 1]).numpy()
    kl = per_row_kl.numpy()

    def accuracy(values: np.ndarray) -> float:
        return float(np.mean(values > 0))

    both = np.stack([base, tuned], axis=1)
    return PairEvaluation(
        n_rows=len(rows),
        base_accuracy=bootstrap_interval(base, accuracy, seed=seed),
        tuned_accuracy=bootstrap_interval(tuned, accuracy, seed=seed),
        base_margin=bootstrap_interval(base, seed=seed),
        tuned_margin=bootstrap_interval(tuned, seed=seed),
        accuracy_gain=bootstrap_interval(
            both, lambda d: accuracy(d[:, 1]) - accuracy(d[:, 0]), seed=seed
        ),
        margin_gain=bootstrap_interval(tuned - base, seed=seed),
        kl=bootstrap_interval(kl, seed=seed),
        rows_sha256=rows_sha256(rows),
    )


def pair_row_splits(pair: ModelPair) -> RowSplits | None:
    """The row splits a registry pair records (``row_splits``), or None when it records none.

    Pipelines evaluating such a pair read ``splits.select(dataset, "evaluation")`` and check
    their rows with ``assert_disjoint(rows, splits.all_except("evaluation"), what=…)``; vector
    extraction reads the ``vector_extraction`` split.
    """
    if pair.row_splits is None:
        return None
    return load_row_splits(resolve_resource(pair.row_splits))


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals pair dpo …`` (train an adapter) and ``mahals pair evaluate …`` (check a pair)."""
    actions = parser.add_subparsers(dest="pair_action", required=True)
    dpo = actions.add_parser("dpo", help="DPO-tune a model with LoRA from a recipe file")
    dpo.add_argument(
        "--recipe", required=True, help="recipe JSON (e.g. recipes/smollm2_dpo_demo.json)"
    )
    dpo.add_argument("--out", required=True, help="folder for the adapter and its metadata")
    dpo.add_argument("--data", default=None, help="folder the recipe's data path is relative to")
    dpo.add_argument("--device", default=None, help="cpu, cuda … (default: cuda when available)")
    check = actions.add_parser("evaluate", help="base vs base+adapter on held-out evaluation rows")
    check.add_argument(
        "--adapter", required=True, help="adapter folder written by 'mahals pair dpo'"
    )
    check.add_argument("--rows", type=int, default=200, help="evaluation rows (default 200)")
    check.add_argument(
        "--max-length", type=int, default=None, help="skip longer rows (default: the recipe's)"
    )
    check.add_argument("--data", default=None, help="folder the recipe's data path is relative to")
    check.add_argument("--device", default=None)
    check.add_argument("--json", default=None, help="also write the evaluation to this JSON file")


def evaluation_rows(
    adapter: str | os.PathLike, tokenizer: Any, *, rows: int, max_length: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> tuple[list[PreferencePair], RowSplits, DPORecipe]:  # fmt: skip
    """The first ``rows`` rows of the adapter's ``evaluation`` split that fit in ``max_length``
    tokens (default: the recipe's), with the adapter's splits and recipe."""
    folder = _adapter_folder(adapter)
    recipe = load_recipe(folder / RECIPE_FILE)
    splits = load_row_splits(folder / ROW_SPLITS_FILE)
    dataset = load_hh_rlhf(_find_data(recipe.data, data_root), verbose=False)
    selected, _ = select_rows(
        splits, dataset.pairs, tokenizer, rows=rows, max_length=max_length or recipe.max_length,
        split="evaluation",
    )  # fmt: skip
    return selected, splits, recipe


def run_from_args(args: argparse.Namespace) -> int:
    if args.pair_action == "dpo":
        recipe = load_recipe(args.recipe)
        print(
            f"DPO-LoRA: {recipe.name} on {recipe.base} ({recipe.rows} rows, {recipe.epochs} epochs)"
        )
        result = train_dpo(recipe, args.out, data_root=args.data, device=args.device)
        final = result.curve[-1] if result.curve else {}
        print(
            f"Trained in {result.seconds:.0f} s ({result.total_seconds:.0f} s in all); final loss "
            f"{final.get('loss', float('nan')):.4f}, reward margin {final.get('rewards/margins', float('nan')):.4f}"
        )
        print(
            f"Adapter: {result.out / ADAPTER_FILE} (training rows sha256 {result.training_rows_sha256})"
        )
        return 0
    import copy

    from mahals.models import load_model

    folder = _adapter_folder(args.adapter)
    recipe = load_recipe(folder / RECIPE_FILE)
    base = load_model(recipe.base, device=args.device, dtype=torch.float32, verbose=False)
    rows, splits, _ = evaluation_rows(
        folder, base.tokenizer, rows=args.rows, max_length=args.max_length, data_root=args.data
    )
    tuned_hf = merge_lora(copy.deepcopy(base.hf), folder)
    result = evaluate_pair(
        base.hf, tuned_hf, base.tokenizer, rows, forbidden_hashes=splits.all_except("evaluation")
    )

    def show(name: str, stat: tuple[float, float, float]) -> None:
        print(f"  {name:<16} {stat[0]:+.4f}  [{stat[1]:+.4f}, {stat[2]:+.4f}]")

    print(f"{recipe.name}: {result.n_rows} held-out evaluation rows (95 % bootstrap CIs)")
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, tuple):
            show(field.name, value)
    if args.json:
        atomic_write_json(args.json, result.to_json())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mahals.pairs dpo|evaluate …``: the same as ``mahals pair …``."""
    parser = argparse.ArgumentParser(prog="mahals pair", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
