"""Anthropic hh-rlhf preference pairs: parsing with drop accounting, and texts for a model pair.

Each hh-rlhf row is ``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …}``: two whole
transcripts that normally share everything up to the last ``"\\n\\nAssistant:"``. A row is kept
as a :class:`PreferencePair` (shared prompt turns + the two final answers) when both transcripts
parse into turns that alternate Human/Assistant, starting with Human and ending with Assistant,
both final answers are non-empty, and the prompt turns agree exactly. Every other row is
counted in a :class:`DropReport` under one :class:`DropReason` (never dropped silently), or,
with ``strict=True``, raises an error naming the row and the reason. Turn texts are stripped of
surrounding whitespace.

Pairing rule: how a base and an instruct model see the same conversation
-------------------------------------------------------------------------
A steering vector ``v = mean(h_instruct − h_base)`` measures what tuning changed only if both
models read the same tokens. :func:`format_pair_texts` makes the choice explicit:

- ``"shared-template"`` (default): both models read the **instruct model's chat template**
  applied to the prompt turns (with its generation prompt), followed by the final answer
  verbatim. One string for both, hence one token sequence whenever the two tokenizers agree
  (they do within the usual base/instruct pairs; :func:`tokenization_mismatches` checks it).
  The difference isolates tuning; the base model reads a format it was not trained on.
- ``"plain"``: both models read the plain transcript ``"\\n\\nHuman: …\\n\\nAssistant: …"``
  (hh-rlhf's own format). Also one string for both, without chat special tokens; the instruct
  model reads a format it was not tuned on.
- ``"native"``: each model reads its own format, the instruct model its chat template and the
  base model the plain transcript. The two members then see different tokens, so the
  difference mixes the change of format with the change of weights; offered only to compare
  with setups that format each model its own way.

In every rule the hidden state of the text's last token belongs to the final answer (the seed's
choice: prompt rendered, answer appended). Texts are meant to be tokenised with the tokenizer's
default special tokens (``add_special_tokens=True``, as ``mahals.capture`` does for strings): a
BOS written by the chat template is removed from the text when the tokenizer adds one itself,
so it is never doubled.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

HH_RLHF_HUB_ID = "Anthropic/hh-rlhf"

Role = Literal["user", "assistant"]
AnswerChoice = Literal["chosen", "rejected"]
ConversationStyle = Literal["auto", "chat", "plain"]
PairingRule = Literal["shared-template", "plain", "native"]
ModelRole = Literal["base", "instruct"]

#: Speaker name of each role in a plain transcript.
SPEAKERS: Mapping[str, str] = {"user": "Human", "assistant": "Assistant"}
_ROLE_OF_SPEAKER: Mapping[str, Role] = {"Human": "user", "Assistant": "assistant"}
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_EXAMPLE_ROWS_KEPT = 5


class DropReason(StrEnum):
    """Why a row was not kept. A dropped row counts once, under the first check it fails, in
    this order: the line is JSON; ``chosen`` and ``rejected`` are present strings; each has an
    Assistant turn; each has well-formed turns; both final answers are non-empty; the prompt
    turns agree."""

    INVALID_JSON = "invalid_json"
    MISSING_KEY = "missing_key"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    MALFORMED_TURNS = "malformed_turns"
    EMPTY_ANSWER = "empty_answer"
    PROMPT_MISMATCH = "prompt_mismatch"


class PreferenceDataError(ValueError):
    """Preference data or a formatting request that cannot be used as given."""


class RowError(PreferenceDataError):
    """One row or transcript that cannot be parsed, with the :class:`DropReason` it falls under."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


@dataclass(frozen=True)
class Turn:
    """One dialogue turn; ``role`` uses chat-template names (Human → user, Assistant → assistant)."""

    role: Role
    text: str


@dataclass(frozen=True)
class PreferencePair:
    """A conversation's shared prompt turns and its two final assistant answers.

    ``prompt_turns`` alternate user/assistant, start and end with a user turn.
    ``source_index`` is the row's 0-based position in the source (files concatenated in order).
    """

    prompt_turns: tuple[Turn, ...]
    chosen: str
    rejected: str
    source_index: int

    def answer(self, which: AnswerChoice) -> str:
        """The chosen or the rejected final answer."""
        if which not in ("chosen", "rejected"):
            raise ValueError(f"answer must be 'chosen' or 'rejected', got {which!r}")
        return self.chosen if which == "chosen" else self.rejected

    def messages(self) -> list[dict[str, str]]:
        """The prompt turns as chat messages (``{"role", "content"}`` dicts)."""
        return [{"role": turn.role, "content": turn.text} for turn in self.prompt_turns]


@dataclass(frozen=True)
class DropReport:
    """How many of ``total_rows`` were dropped, per reason, with the first few row indices."""

    total_rows: int
    counts: Mapping[DropReason, int]
    example_rows: Mapping[DropReason, tuple[int, ...]]

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.total_rows - self.dropped

    def summary(self) -> str:
        """One line, e.g. ``2312 rows: 2299 kept, 13 dropped (empty_answer 4: rows 86, 516, 925, 1103; …)``."""
        line = f"{self.total_rows} rows: {self.kept} kept, {self.dropped} dropped"
        if not self.counts:
            return line
        parts = []
        for reason, count in sorted(self.counts.items()):
            rows = ", ".join(str(i) for i in self.example_rows[reason])
            parts.append(
                f"{reason} {count}: rows {rows}{', …' if count > len(self.example_rows[reason]) else ''}"
            )
        return f"{line} ({'; '.join(parts)})"


@dataclass(frozen=True)
class PreferenceDataset:
    """Kept preference pairs, the drop report of the parse, and a description of the source.

    ``drops`` describes every row read, before any selection by :meth:`sample`.
    """

    pairs: tuple[PreferencePair, ...]
    drops: DropReport
    source: str

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]

    def sample(self, n: int, *, seed: int | None = None, strict: bool = False) -> PreferenceDataset:
        """``n`` pairs: the first ``n`` when ``seed`` is None, else ``n`` drawn at random with that
        seed; kept in source order. Fewer than ``n`` pairs → all of them, with a warning (an
        error when ``strict``)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if n > len(self.pairs):
            message = f"asked for {n} pairs but {self.source} has {len(self.pairs)} usable pairs; using all"
            if strict:
                raise PreferenceDataError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            return self
        if seed is None:
            chosen = range(n)
        else:
            chosen = sorted(
                np.random.default_rng(seed).choice(len(self.pairs), size=n, replace=False)
            )
        return PreferenceDataset(tuple(self.pairs[i] for i in chosen), self.drops, self.source)


def parse_transcript(transcript: str) -> tuple[Turn, ...]:
    """Turns of a ``"\\n\\nHuman: …\\n\\nAssistant: …"`` transcript, texts stripped.

    Leading whitespace is ignored (a transcript may start with ``"Human:"``). Raises
    :class:`RowError` with ``NO_ASSISTANT_TURN`` when there is no Assistant turn, and with
    ``MALFORMED_TURNS`` when text precedes the first turn or the turns do not alternate
    Human/Assistant starting with Human and ending with Assistant.
    """
    pieces = _TURN_MARKER.split("\n\n" + transcript.lstrip())
    preamble, speakers, texts = pieces[0], pieces[1::2], pieces[2::2]
    if "Assistant" not in speakers:
        raise RowError(DropReason.NO_ASSISTANT_TURN, "no '\\n\\nAssistant:' turn")
    if preamble.strip():
        raise RowError(DropReason.MALFORMED_TURNS, f"text before the first turn: {preamble[:40]!r}")
    for position, speaker in enumerate(speakers):
        expected = "Human" if position % 2 == 0 else "Assistant"
        if speaker != expected:
            raise RowError(
                DropReason.MALFORMED_TURNS, f"turn {position} is {speaker}, expected {expected}"
            )
    if speakers[-1] != "Assistant":
        raise RowError(DropReason.MALFORMED_TURNS, "the last turn is Human, not Assistant")
    return tuple(
        Turn(_ROLE_OF_SPEAKER[s], text.strip()) for s, text in zip(speakers, texts, strict=True)
    )


@dataclass(frozen=True)
class _UnreadableLine:
    error: str


def _parse_row(row: object) -> tuple[tuple[Turn, ...], str, str]:
    """(prompt turns, chosen answer, rejected answer) of one row; raises :class:`RowError`."""
    if isinstance(row, _UnreadableLine):
        raise RowError(DropReason.INVALID_JSON, row.error)
    if not isinstance(row, Mapping):
        raise RowError(DropReason.MISSING_KEY, f"row is a {type(row).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(
                DropReason.MISSING_KEY, f"no {key!r} key (keys: {sorted(map(str, row))})"
            )
        if not isinstance(row[key], str):
            raise RowError(
                DropReason.MISSING_KEY, f"{key!r} is a {type(row[key]).__name__}, not a string"
            )
    conversations = {}
    for key in ("chosen", "rejected"):
        try:
            conversations[key] = parse_transcript(row[key])
        except RowError as error:
            raise RowError(error.reason, f"{key}: {error.detail}") from None
    chosen_turns, rejected_turns = conversations["chosen"], conversations["rejected"]
    empty = [key for key, turns in conversations.items() if not turns[-1].text]
    if empty:
        raise RowError(
            DropReason.EMPTY_ANSWER, f"the final answer of {' and '.join(empty)} is empty"
        )
    if chosen_turns[:-1] != rejected_turns[:-1]:
        first = next(
            (
                i
                for i, (a, b) in enumerate(
                    zip(chosen_turns[:-1], rejected_turns[:-1], strict=False)
                )
                if a != b
            ),
            min(len(chosen_turns), len(rejected_turns)) - 1,
        )
        raise RowError(
            DropReason.PROMPT_MISMATCH,
            f"chosen and rejected differ before the final answer (first at turn {first})",
        )
    return chosen_turns[:-1], chosen_turns[-1].text, rejected_turns[-1].text


def _parse_located_rows(
    rows: Iterable[tuple[str, object]], *, source: str, strict: bool
) -> PreferenceDataset:
    pairs: list[PreferencePair] = []
    counts: Counter[DropReason] = Counter()
    examples: dict[DropReason, list[int]] = {}
    total = 0
    for index, (location, row) in enumerate(rows):
        total += 1
        try:
            prompt_turns, chosen, rejected = _parse_row(row)
        except RowError as error:
            if strict:
                raise RowError(error.reason, f"row {index} ({location}): {error.detail}") from None
            counts[error.reason] += 1
            shown = examples.setdefault(error.reason, [])
            if len(shown) < _EXAMPLE_ROWS_KEPT:
                shown.append(index)
            continue
        pairs.append(PreferencePair(prompt_turns, chosen, rejected, index))
    report = DropReport(
        total, dict(counts), {reason: tuple(rows) for reason, rows in examples.items()}
    )
    return PreferenceDataset(tuple(pairs), report, source)


def parse_hh_rlhf_rows(
    rows: Iterable[object], *, source: str = "rows", strict: bool = False
) -> PreferenceDataset:
    """Parse hh-rlhf rows (dicts with ``chosen`` and ``rejected``) already in memory.

    Rows that cannot be kept are counted in ``drops`` by :class:`DropReason`; with ``strict``
    the first one raises :class:`RowError` naming its index and reason.
    """
    return _parse_located_rows(
        ((f"row {i}", row) for i, row in enumerate(rows)), source=source, strict=strict
    )


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """(``path:line``, parsed row) for every non-blank line; bad JSON yields an unreadable row."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row: object = json.loads(line)
                except json.JSONDecodeError as error:
                    row = _UnreadableLine(f"invalid JSON ({error})")
                yield f"{path}:{line_number}", row
    except UnicodeDecodeError as error:
        raise PreferenceDataError(
            f"{path}: line {line_number + 1} is not UTF-8 text ({error.reason})"
        ) from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        what = "not a gzip file" if isinstance(error, gzip.BadGzipFile) else "truncated gzip data"
        raise PreferenceDataError(
            f"{path}: {what} after line {line_number} ({error}); download it again"
        ) from error


def _local_files(root: Path, *, data_dir: str | None, split: str) -> list[Path]:
    """The jsonl(.gz) files a local source stands for.

    A file is itself; a directory holding ``{split}.jsonl[.gz]`` is that file; otherwise every
    subfolder's ``{split}.jsonl[.gz]`` (the layout of github.com/anthropics/hh-rlhf), sorted.
    """
    if data_dir is not None:
        if root.is_file():
            raise ValueError(
                f"data_dir={data_dir!r} needs a directory or a hub id, not the file {root}"
            )
        root = root / data_dir
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or directory: {root}")

    def split_file(folder: Path) -> Path | None:
        found = [
            folder / f"{split}{ext}"
            for ext in (".jsonl", ".jsonl.gz")
            if (folder / f"{split}{ext}").is_file()
        ]
        if len(found) > 1:
            raise PreferenceDataError(
                f"both {found[0]} and {found[1]} exist; pass one of them as source"
            )
        return found[0] if found else None

    direct = split_file(root)
    if direct is not None:
        return [direct]
    nested = [
        file
        for folder in sorted(root.iterdir())
        if folder.is_dir() and (file := split_file(folder))
    ]
    if not nested:
        raise FileNotFoundError(f"no {split}.jsonl or {split}.jsonl.gz in {root} or its subfolders")
    return nested


def _is_local(source: str | PathLike[str]) -> bool:
    if isinstance(source, PathLike):
        return True
    return Path(source).exists() or source.endswith((".jsonl", ".jsonl.gz", ".json.gz"))


def load_hh_rlhf(
    source: str | PathLike[str] = HH_RLHF_HUB_ID,
    *,
    data_dir: str | None = None,
    split: str = "test",
    n: int | None = None,
    seed: int | None = None,
    strict: bool = False,
    verbose: bool = True,
) -> PreferenceDataset:
    """Load hh-rlhf preference pairs from the HF hub or local jsonl(.gz) files.

    ``source`` is a hub id (``datasets.load_dataset(source, data_dir=data_dir, split=split)``;
    ``data_dir`` picks one subset such as ``"harmless-base"``, None = all four preference
    subsets) or a local path: a ``.jsonl`` / ``.jsonl.gz`` file, a folder with
    ``{split}.jsonl[.gz]``, or a folder of subset folders (``data_dir`` picks one; None = all,
    concatenated in name order). Unusable rows are counted in ``drops`` (see
    :class:`DropReason`), or raise with ``strict``. ``n`` keeps that many pairs (the first ones,
    or a random draw when ``seed`` is given; see :meth:`PreferenceDataset.sample`).
    ``verbose`` prints the drop summary.
    """
    if _is_local(source):
        files = _local_files(Path(source), data_dir=data_dir, split=split)
        rows: Iterable[tuple[str, object]] = (row for file in files for row in _read_jsonl(file))
        description = ", ".join(str(file) for file in files)
    else:
        import datasets

        hub_split = datasets.load_dataset(str(source), data_dir=data_dir, split=split)
        description = f"{source} ({data_dir or 'all subsets'}, {split})"
        rows = ((f"{description} row {i}", row) for i, row in enumerate(hub_split))
    dataset = _parse_located_rows(rows, source=description, strict=strict)
    if verbose:
        print(f"hh-rlhf {description}: {dataset.drops.summary()}")
    if n is not None:
        dataset = dataset.sample(n, seed=seed, strict=strict)
    return dataset


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (instruct models usually do)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _template_bos(tokenizer: Any) -> str | None:
    """The BOS text to cut from a rendered chat template: set only when the tokenizer adds its
    BOS by itself, so that tokenising the text with special tokens yields exactly one."""
    bos_text, bos_id = (
        getattr(tokenizer, "bos_token", None),
        getattr(tokenizer, "bos_token_id", None),
    )
    if not bos_text or bos_id is None:
        return None
    probe = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    return bos_text if probe[:1] == [bos_id] else None


def _plain_text(pair: PreferencePair, answer_text: str | None) -> str:
    turns = "".join(f"\n\n{SPEAKERS[turn.role]}: {turn.text}" for turn in pair.prompt_turns)
    return turns + ("\n\nAssistant:" if answer_text is None else f"\n\nAssistant: {answer_text}")


def _chat_text(
    pair: PreferencePair, answer_text: str | None, tokenizer: Any, bos: str | None
) -> str:
    rendered = tokenizer.apply_chat_template(
        pair.messages(), tokenize=False, add_generation_prompt=True
    )
    if bos is not None and rendered.startswith(bos):
        rendered = rendered[len(bos) :]
    return rendered if answer_text is None else rendered + answer_text


def _require_chat_template(tokenizer: Any, why: str) -> None:
    if tokenizer is None or not has_chat_template(tokenizer):
        raise PreferenceDataError(
            f"{why} needs a tokenizer with a chat template; use the 'plain' format instead"
        )


def format_conversation(
    pair: PreferencePair,
    answer: AnswerChoice | None = "chosen",
    tokenizer: Any = None,
    *,
    style: ConversationStyle = "auto",
) -> str:
    """One model-ready text: the prompt turns, then the chosen or rejected answer.

    ``style="chat"``: the tokenizer's chat template over the prompt turns with its generation
    prompt, answer appended verbatim. ``style="plain"``: the transcript
    ``"\\n\\nHuman: …\\n\\nAssistant: <answer>"`` (no tokenizer needed). ``style="auto"``: chat
    when the tokenizer has a chat template, plain otherwise. ``answer=None`` stops after the
    generation prompt (``"\\n\\nAssistant:"`` in plain style), for generation.
    """
    answer_text = None if answer is None else pair.answer(answer)
    if style == "auto":
        style = "chat" if has_chat_template(tokenizer) else "plain"
    if style == "plain":
        return _plain_text(pair, answer_text)
    if style == "chat":
        _require_chat_template(tokenizer, "style='chat'")
        return _chat_text(pair, answer_text, tokenizer, _template_bos(tokenizer))
    raise ValueError(f"unknown style {style!r}; use 'auto', 'chat' or 'plain'")


def format_pair_texts(
    dataset: Iterable[PreferencePair],
    rule: PairingRule = "shared-template",
    instruct_tokenizer: Any = None,
    answer: AnswerChoice | None = "chosen",
    *,
    model: ModelRole | None = None,
) -> list[str]:
    """The texts a base/instruct pair reads for ``dataset``, one per pair, under ``rule``.

    ``"shared-template"`` (default): the instruct tokenizer's chat template over the prompt +
    the answer, the same text for both models. ``"plain"``: the plain Human/Assistant
    transcript for both. ``"native"``: each model its own format, so ``model`` must say which
    (``"instruct"`` → chat template, ``"base"`` → plain transcript); the two lists differ and
    the difference of hidden states then also measures the format (see the module docstring).
    For the shared rules ``model`` may be omitted: both members get the returned list.
    """
    if rule == "shared-template":
        style: ConversationStyle = "chat"
    elif rule == "plain":
        style = "plain"
    elif rule == "native":
        if model not in ("base", "instruct"):
            raise ValueError(
                f"rule='native' gives each model its own text: pass model='base' or 'instruct', got {model!r}"
            )
        style = "chat" if model == "instruct" else "plain"
    else:
        raise ValueError(
            f"unknown pairing rule {rule!r}; use 'shared-template', 'plain' or 'native'"
        )
    pairs = list(dataset)
    if style == "plain":
        return [
            _plain_text(pair, None if answer is None else pair.answer(answer)) for pair in pairs
        ]
    _require_chat_template(instruct_tokenizer, f"pairing rule {rule!r}")
    bos = _template_bos(instruct_tokenizer)
    return [
        _chat_text(pair, None if answer is None else pair.answer(answer), instruct_tokenizer, bos)
        for pair in pairs
    ]


def tokenization_mismatches(
    texts: Sequence[str], base_tokenizer: Any, instruct_tokenizer: Any
) -> list[int]:
    """Indices of ``texts`` that the two tokenizers turn into different token ids (with their
    default special tokens). Empty means a shared text gives both models the same tokens."""
    base_ids = base_tokenizer(list(texts))["input_ids"]
    instruct_ids = instruct_tokenizer(list(texts))["input_ids"]
    return [
        i for i, (a, b) in enumerate(zip(base_ids, instruct_ids, strict=True)) if list(a) != list(b)
    ]
