"""hh-rlhf preference pairs: parsing, drop accounting, loading, model-ready texts."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mahals.data import (
    DropReason,
    PreferenceDataError,
    RowError,
    Turn,
    format_conversation,
    format_pair_texts,
    load_hh_rlhf,
    parse_hh_rlhf_rows,
    parse_transcript,
    tokenization_mismatches,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_DIR = SHARED_DATA / "hh-rlhf"
HARMLESS_TEST = HH_DIR / "harmless-base" / "test.jsonl.gz"

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def transcript(*turns: str) -> str:
    """Alternating Human/Assistant transcript in hh-rlhf's format."""
    speakers = ("Human", "Assistant")
    return "".join(f"\n\n{speakers[i % 2]}: {text}" for i, text in enumerate(turns))


def row(*prompt: str, chosen: str = "good answer", rejected: str = "bad answer") -> dict:
    return {"chosen": transcript(*prompt, chosen), "rejected": transcript(*prompt, rejected)}


def tiny_tokenizer(*, chat: bool = True, adds_bos: bool = True, words=("hello", "world")):
    """A word-level tokenizer with ``<s>`` as BOS, optionally added automatically."""
    vocab = {word: i for i, word in enumerate(("<unk>", "<s>", "</s>", *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


# --- real data ------------------------------------------------------------------------------


@pytest.mark.skipif(
    not HARMLESS_TEST.is_file(), reason=f"hh-rlhf copy not found at {HARMLESS_TEST}"
)
def test_harmless_base_parses_with_every_row_accounted_for():
    with gzip.open(HARMLESS_TEST, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle if line.strip()]
    dataset = load_hh_rlhf(HH_DIR, data_dir="harmless-base", split="test", verbose=False)

    assert dataset.drops.total_rows == len(raw) == 2312
    assert len(dataset) + sum(dataset.drops.counts.values()) == len(raw)
    assert 2250 < len(dataset) < len(raw)
    kept = {pair.source_index for pair in dataset}
    for pair in dataset:
        source = raw[pair.source_index]
        chosen_prompt, chosen_answer = source["chosen"].rsplit("\n\nAssistant:", 1)
        rejected_prompt, rejected_answer = source["rejected"].rsplit("\n\nAssistant:", 1)
        assert chosen_prompt == rejected_prompt
        assert (pair.chosen, pair.rejected) == (chosen_answer.strip(), rejected_answer.strip())
        # the plain transcript rebuilds the original text exactly
        assert format_conversation(pair, "chosen", style="plain") == source["chosen"]
        assert format_conversation(pair, "rejected", style="plain") == source["rejected"]

    def independently_bad(source: dict) -> bool:
        roles = [re.findall(r"\n\n(Human|Assistant):", source[k]) for k in ("chosen", "rejected")]
        alternating = all(r == ["Human", "Assistant"] * (len(r) // 2) and r for r in roles)
        answers = [
            source[k].rsplit("\n\nAssistant:", 1)[-1].strip() for k in ("chosen", "rejected")
        ]
        prompts = {source[k].rsplit("\n\nAssistant:", 1)[0] for k in ("chosen", "rejected")}
        return not alternating or not all(answers) or len(prompts) != 1

    dropped = [i for i in range(len(raw)) if i not in kept]
    assert dropped and all(independently_bad(raw[i]) for i in dropped)
    for reason, rows in dataset.drops.example_rows.items():
        assert set(rows) <= set(dropped), reason


# --- parsing and drops ----------------------------------------------------------------------


def test_parse_transcript_turns_and_errors():
    assert parse_transcript(
        "\n\nHuman:  hi \n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok"
    ) == (
        Turn("user", "hi"),
        Turn("assistant", "hello"),
        Turn("user", "bye"),
        Turn("assistant", "ok"),
    )
    assert parse_transcript("Human: hi\n\nAssistant: yo") == (
        Turn("user", "hi"),
        Turn("assistant", "yo"),
    )
    cases = {
        "\n\nHuman: hi there": DropReason.NO_ASSISTANT_TURN,
        "preamble\n\nHuman: hi\n\nAssistant: yo": DropReason.MALFORMED_TURNS,
        "\n\nAssistant: yo": DropReason.MALFORMED_TURNS,
        "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c": DropReason.MALFORMED_TURNS,
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c": DropReason.MALFORMED_TURNS,
    }
    for text, reason in cases.items():
        with pytest.raises(RowError) as error:
            parse_transcript(text)
        assert error.value.reason == reason, text


BAD_ROWS = [
    row("q1", "a1", "q2"),  # 0: kept
    {"chosen": transcript("q", "a")},  # 1: missing key
    {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"},  # 2: no Assistant turn
    {"chosen": transcript("q", "a"), "rejected": transcript("other q", "b")},  # 3: mismatch
    row("q", chosen=""),  # 4: empty answer
    ["not", "an", "object"],  # 5: missing key
    {"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"},  # 6: malformed
    {"chosen": 3, "rejected": transcript("q", "a")},  # 7: missing key (not a string)
    row("q3"),  # 8: kept
]


def test_bad_rows_are_counted_by_reason():
    dataset = parse_hh_rlhf_rows(BAD_ROWS, source="fixture")
    assert [pair.source_index for pair in dataset] == [0, 8]
    assert dataset[0].prompt_turns == (
        Turn("user", "q1"),
        Turn("assistant", "a1"),
        Turn("user", "q2"),
    )
    assert (dataset[0].chosen, dataset[0].rejected) == ("good answer", "bad answer")
    assert dataset.drops.counts == {
        DropReason.MISSING_KEY: 3,
        DropReason.NO_ASSISTANT_TURN: 1,
        DropReason.PROMPT_MISMATCH: 1,
        DropReason.EMPTY_ANSWER: 1,
        DropReason.MALFORMED_TURNS: 1,
    }
    assert dataset.drops.example_rows[DropReason.MISSING_KEY] == (1, 5, 7)
    assert (dataset.drops.total_rows, dataset.drops.kept, dataset.drops.dropped) == (9, 2, 7)
    assert "missing_key 3: rows 1, 5, 7" in dataset.drops.summary()


@pytest.mark.parametrize(
    ("index", "reason", "detail"),
    [
        (1, DropReason.MISSING_KEY, "no 'rejected' key"),
        (2, DropReason.NO_ASSISTANT_TURN, "chosen"),
        (3, DropReason.PROMPT_MISMATCH, "turn 0"),
        (4, DropReason.EMPTY_ANSWER, "chosen"),
    ],
)
def test_strict_raises_naming_row_and_reason(index, reason, detail):
    with pytest.raises(RowError) as error:
        parse_hh_rlhf_rows([BAD_ROWS[0], BAD_ROWS[index]], strict=True)
    assert error.value.reason == reason
    assert "row 1 " in str(error.value) and reason.value in str(error.value)
    assert detail in str(error.value)


# --- local files, hub, selection ------------------------------------------------------------


def write_jsonl(path: Path, rows: list, *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_local_file_with_invalid_json_line(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row("a"), "{not json\n", "\n", row("b")])
    dataset = load_hh_rlhf(path, verbose=False)
    assert [pair.prompt_turns[0].text for pair in dataset] == ["a", "b"]
    assert dataset.drops.counts == {DropReason.INVALID_JSON: 1}
    with pytest.raises(RowError, match=r"row 1 \(.*rows\.jsonl:2\): invalid JSON"):
        load_hh_rlhf(path, strict=True, verbose=False)


def test_local_folder_of_subsets(tmp_path):
    write_jsonl(tmp_path / "b-subset" / "test.jsonl.gz", [row("b0"), row("b1")], gz=True)
    write_jsonl(tmp_path / "a-subset" / "test.jsonl", [row("a0")])
    write_jsonl(tmp_path / "a-subset" / "train.jsonl", [row("train")])

    every = load_hh_rlhf(tmp_path, verbose=False)
    assert [p.prompt_turns[0].text for p in every] == ["a0", "b0", "b1"]
    assert [p.source_index for p in every] == [0, 1, 2]
    one = load_hh_rlhf(tmp_path, data_dir="b-subset", verbose=False)
    assert [p.prompt_turns[0].text for p in one] == ["b0", "b1"]
    train = load_hh_rlhf(tmp_path, split="train", verbose=False)
    assert [p.prompt_turns[0].text for p in train] == ["train"]
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        load_hh_rlhf(tmp_path, split="validation", verbose=False)
    with pytest.raises(ValueError, match="data_dir"):
        load_hh_rlhf(tmp_path / "a-subset" / "test.jsonl", data_dir="x", verbose=False)


def test_verbose_prints_the_drop_summary(tmp_path, capsys):
    load_hh_rlhf(write_jsonl(tmp_path / "r.jsonl", [row("a"), {"chosen": "x"}]))
    assert "2 rows: 1 kept, 1 dropped (missing_key 1: rows 1)" in capsys.readouterr().out


def test_hub_id_goes_through_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return [row("hub q"), {"chosen": "broken"}]

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    dataset = load_hh_rlhf(data_dir="harmless-base", split="train", verbose=False)
    assert calls == [("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "train"})]
    assert len(dataset) == 1 and dataset.drops.counts == {DropReason.MISSING_KEY: 1}
    assert "harmless-base" in dataset.source


def test_n_and_seed_select_pairs(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [row(f"q{i}") for i in range(20)])
    first = load_hh_rlhf(path, n=5, verbose=False)
    assert [p.source_index for p in first] == [0, 1, 2, 3, 4]
    drawn = load_hh_rlhf(path, n=5, seed=1, verbose=False)
    indices = [p.source_index for p in drawn]
    assert indices == sorted(set(indices)) and len(indices) == 5
    assert load_hh_rlhf(path, n=5, seed=1, verbose=False) == drawn
    assert {p.source_index for p in load_hh_rlhf(path, n=5, seed=2, verbose=False)} != set(indices)
    assert drawn.drops.total_rows == 20
    with pytest.warns(UserWarning, match="asked for 30 pairs"):
        assert len(load_hh_rlhf(path, n=30, verbose=False)) == 20
    with pytest.raises(PreferenceDataError, match="asked for 30 pairs"):
        load_hh_rlhf(path, n=30, strict=True, verbose=False)


# --- formatting -----------------------------------------------------------------------------

PAIR = parse_hh_rlhf_rows([row("hello", "world", "again", chosen="yes", rejected="no")])[0]
CHAT_PROMPT = "<|user|>hello<|end|><|assistant|>world<|end|><|user|>again<|end|><|assistant|>"
PLAIN_PROMPT = "\n\nHuman: hello\n\nAssistant: world\n\nHuman: again\n\nAssistant:"


def test_chat_template_path_and_single_bos():
    tokenizer = tiny_tokenizer()
    text = format_conversation(PAIR, "chosen", tokenizer)
    assert text == CHAT_PROMPT + "yes"
    assert format_conversation(PAIR, "rejected", tokenizer) == CHAT_PROMPT + "no"
    assert format_conversation(PAIR, None, tokenizer) == CHAT_PROMPT
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_template_bos_is_kept_when_the_tokenizer_adds_none():
    tokenizer = tiny_tokenizer(adds_bos=False)
    text = format_conversation(PAIR, "chosen", tokenizer)
    assert text == "<s>" + CHAT_PROMPT + "yes"
    assert tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 1


def test_plain_transcript_path():
    assert format_conversation(PAIR, "chosen", tiny_tokenizer(chat=False)) == PLAIN_PROMPT + " yes"
    assert (
        format_conversation(PAIR, "rejected", tiny_tokenizer(), style="plain")
        == PLAIN_PROMPT + " no"
    )
    assert format_conversation(PAIR, None) == PLAIN_PROMPT
    with pytest.raises(PreferenceDataError, match="chat template"):
        format_conversation(PAIR, "chosen", tiny_tokenizer(chat=False), style="chat")


def test_pairing_rules():
    pairs = parse_hh_rlhf_rows([row("a", chosen="c1"), row("b", "x", "y", chosen="c2")])
    instruct = tiny_tokenizer()
    shared = format_pair_texts(pairs, "shared-template", instruct, "chosen")
    assert shared == [format_conversation(p, "chosen", instruct, style="chat") for p in pairs]
    assert format_pair_texts(pairs, "shared-template", instruct, model="base") == shared
    assert format_pair_texts(pairs, "shared-template", instruct, model="instruct") == shared

    plain = format_pair_texts(pairs, "plain", instruct, "rejected")
    assert plain == [format_conversation(p, "rejected", style="plain") for p in pairs]

    native_base = format_pair_texts(pairs, "native", instruct, model="base")
    native_instruct = format_pair_texts(pairs, "native", instruct, model="instruct")
    assert native_base == [format_conversation(p, "chosen", style="plain") for p in pairs]
    assert native_instruct == shared
    assert all(b != i for b, i in zip(native_base, native_instruct, strict=True))

    with pytest.raises(ValueError, match="model='base' or 'instruct'"):
        format_pair_texts(pairs, "native", instruct)
    with pytest.raises(PreferenceDataError, match="chat template"):
        format_pair_texts(pairs, "shared-template", tiny_tokenizer(chat=False))
    # The Literal annotation rejects it first under the test-time type checker.
    with pytest.raises((ValueError, TypeError), match="unknown pairing rule|same"):
        format_pair_texts(pairs, "same", instruct)


def test_tokenization_mismatches():
    texts = ["hello world", "world", "unknown words"]
    same = tokenization_mismatches(texts, tiny_tokenizer(chat=False), tiny_tokenizer())
    assert same == []
    swapped = tiny_tokenizer(words=("world", "hello"))
    assert tokenization_mismatches(texts, tiny_tokenizer(), swapped) == [0, 1]
