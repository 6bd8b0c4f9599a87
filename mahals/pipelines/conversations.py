"""Phase 2.1's data: which hh-rlhf conversations a pair reads, and the texts each side reads.

Which texts the two models read is the pairing rule (:func:`mahals.data.format_pair_texts`):
``"shared-template"`` (both read the tuned model's chat template), ``"plain"`` (both read the
plain Human/Assistant transcript) or ``"native"`` (each its own format). A pair's own
``pairing`` registry field wins over the run's default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from mahals.data.hh_rlhf import (
    PairingRule,
    PreferenceDataError,
    PreferenceDataset,
    format_pair_texts,
    load_hh_rlhf,
)
from mahals.data.splits import RowSplits, assert_disjoint, row_hash
from mahals.registry import ModelPair
from mahals.steering import ANSWERS, Answer

__all__ = [
    "PAIRING_RULES",
    "ROLES",
    "Role",
    "is_format_pair",
    "load_conversations",
    "pair_texts",
    "vector_meaning",
]

log = logging.getLogger(__name__)

Role = Literal["base", "tuned"]
ROLES: tuple[Role, ...] = ("base", "tuned")
PAIRING_RULES: tuple[str, ...] = ("shared-template", "plain", "native")


def load_conversations(
    source: str,
    *,
    data_dir: str | None,
    split: str,
    n: int,
    max_chars: int | None,
    min_rows: int,
    seed: int | None = None,
    extraction_splits: Mapping[str, RowSplits] | None = None,
) -> tuple[PreferenceDataset, dict[str, Any]]:
    """``n`` usable conversations of ``source`` and a JSON record of how they were selected.

    Conversations whose plain transcripts (with the chosen and with the rejected answer) are
    longer than ``max_chars`` characters are dropped first (``None``: no filter). Then the first
    ``n`` are kept, or ``n`` drawn with ``seed``; fewer than ``n`` → all of them, with a
    warning, unless fewer than ``min_rows``. ``extraction_splits`` (pair key → its
    :class:`~mahals.data.splits.RowSplits`) keeps only rows in every such pair's
    ``vector_extraction`` split, checked disjoint from the rows that built or evaluate the pair.

    Raises:
        PreferenceDataError: no usable conversation, or fewer than ``min_rows``.
    """
    log.info("\nLoading %s dataset (%d samples)...", source, n)
    dataset = load_hh_rlhf(source, data_dir=data_dir, split=split, verbose=False)
    drops = dataset.drops
    log.info("  %s: %s", dataset.source, drops.summary())
    if len(dataset) == 0:
        raise PreferenceDataError(
            f"{dataset.source}: no usable preference pairs ({drops.summary()})"
        )
    usable = len(dataset)
    if max_chars is not None:
        short = tuple(
            pair
            for pair in dataset
            if all(
                len(text) <= max_chars
                for answer in ANSWERS
                for text in format_pair_texts([pair], "plain", None, answer)
            )
        )
        log.info(
            "  %d of %d conversations are at most %d characters long", len(short), usable, max_chars
        )
        dataset = PreferenceDataset(short, drops, dataset.source)
    for key, splits in (extraction_splits or {}).items():
        allowed = splits.split_of("vector_extraction")
        kept = tuple(pair for pair in dataset if row_hash(pair) in allowed)
        assert_disjoint(kept, splits.all_except("vector_extraction"), what=f"{key} extraction")
        log.info("  %d conversations are in pair %s's vector_extraction split", len(kept), key)
        dataset = PreferenceDataset(kept, drops, dataset.source)
    if len(dataset) < n:
        log.warning(
            "  WARNING: asked for %d conversations, only %d are usable: using all of them",
            n,
            len(dataset),
        )
        if len(dataset) < min_rows:
            raise PreferenceDataError(
                f"{dataset.source}: {len(dataset)} usable conversations, at least {min_rows} needed"
            )
    else:
        dataset = dataset.sample(n, seed=seed)
    log.info("Extracted %d valid samples", len(dataset))
    record = {
        "source": dataset.source,
        "rows_read": drops.total_rows,
        "rows_kept": drops.kept,
        "rows_dropped": drops.dropped,
        "dropped_by_reason": {str(reason): count for reason, count in sorted(drops.counts.items())},
        "drop_summary": drops.summary(),
        "max_chars": max_chars,
        "row_split": "vector_extraction" if extraction_splits else None,
        "n_samples": len(dataset),
        "first_source_rows": [pair.source_index for pair in dataset.pairs[:10]],
    }
    return dataset, record


def pair_texts(
    dataset: PreferenceDataset, rule: PairingRule, tuned_tokenizer: Callable[[], Any]
) -> dict[tuple[Role, Answer], list[str]]:
    """The texts each side of a pair reads, per answer kind, under pairing rule ``rule``.

    ``tuned_tokenizer()`` is called only when a chat template has to be rendered.
    """
    texts: dict[tuple[Role, Answer], list[str]] = {}
    for role in ROLES:
        if rule != "native" and role == "tuned":  # shared rules: one text for both models
            texts.update({("tuned", answer): texts["base", answer] for answer in ANSWERS})
            continue
        needs_template = rule == "shared-template" or role == "tuned"
        tokenizer = tuned_tokenizer() if needs_template else None
        side = {"base": "base", "tuned": "instruct"}[role] if rule == "native" else None
        for answer in ANSWERS:
            texts[role, answer] = format_pair_texts(dataset, rule, tokenizer, answer, model=side)
    return texts


def is_format_pair(pair: ModelPair) -> bool:
    """One model on both sides: only the input format differs (the offline demo's pair)."""
    return pair.base == pair.tuned or pair.tuning == "format"


def vector_meaning(pair: ModelPair, rule: PairingRule) -> str:
    """One sentence saying what ``mean(h_tuned − h_base)`` measures for this pair."""
    if is_format_pair(pair):
        return (
            f"FORMAT vector, not a tuning vector: base and tuned are the same weights "
            f"({pair.base.key}); the 'base' side reads the plain Human/Assistant transcript and "
            f"the 'tuned' side the chat template (pairing rule {rule!r}), so the difference "
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
