"""Resumable checkpoints: resume / fresh / skip, prompting, settings checks, atomic writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from mahals import io as io_module
from mahals.io import atomic_write_json
from mahals.pipelines.checkpoint import (
    Checkpoint,
    CheckpointChoice,
    CheckpointError,
    add_checkpoint_flags,
    stdin_is_terminal,
)
from mahals.pipelines.common import ITEM_RESULT_NAME, run_checkpointed

MODELS = ("Llama3_8B", "Mistral_7B", "Qwen2_7B", "Gemma2_9B")
SETTINGS = {"mode": "sanity", "n_samples": 100, "layers": [0, 1, 2]}


def never_called(prompt: str) -> str:
    raise AssertionError(f"input() must not be called, was called with {prompt!r}")


class ScriptedInput:
    """An ``input`` replacement returning ``answers`` in turn and recording the prompts."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def open_checkpoint(path: Path, choice=None, *, ask=never_called, terminal=False, said=None, **kw):
    """:meth:`Checkpoint.open` with injected input/terminal and captured console lines."""
    lines = said if said is not None else []
    return Checkpoint.open(
        path,
        kw.pop("items", MODELS),
        kw.pop("settings", SETTINGS),
        choice,
        ask=ask,
        is_terminal=lambda: terminal,
        say=lines.append,
    )


@pytest.fixture
def ckpt_path(tmp_path: Path) -> Path:
    return tmp_path / "phase1_aqi_checkpoint.json"


@pytest.fixture
def two_done(ckpt_path: Path) -> Path:
    """A checkpoint file with Mistral_7B then Llama3_8B completed (recorded out of order)."""
    checkpoint = open_checkpoint(ckpt_path)
    checkpoint.record("Mistral_7B", {"aqi": 55.0})
    checkpoint.record("Llama3_8B", {"aqi": 34.8, "per_axiom": (1.0, 2.0)})
    return ckpt_path


def test_new_checkpoint_is_empty_and_not_written_until_a_record(ckpt_path: Path) -> None:
    said: list[str] = []
    checkpoint = open_checkpoint(ckpt_path, said=said)
    assert checkpoint.completed == ()
    assert checkpoint.pending == MODELS
    assert checkpoint.results == {}
    assert checkpoint.decision is None
    assert not ckpt_path.exists()
    assert said == []
    checkpoint.record("Qwen2_7B", {"aqi": 15.0})
    assert ckpt_path.exists()


def test_record_then_reopen_sees_completed_items_in_item_order(two_done: Path) -> None:
    checkpoint = open_checkpoint(two_done, CheckpointChoice.RESUME)
    assert checkpoint.completed == ("Llama3_8B", "Mistral_7B")
    assert checkpoint.pending == ("Qwen2_7B", "Gemma2_9B")
    assert list(checkpoint.results) == ["Llama3_8B", "Mistral_7B"]
    assert checkpoint.result("Mistral_7B") == {"aqi": 55.0}
    assert checkpoint.decision is CheckpointChoice.RESUME
    with pytest.raises(KeyError, match="Qwen2_7B"):
        checkpoint.result("Qwen2_7B")


def test_result_reads_the_same_before_and_after_reopen(ckpt_path: Path) -> None:
    checkpoint = open_checkpoint(ckpt_path)
    checkpoint.record("Qwen2_7B", {"curve": (1.5, 2.5), "n": 3})
    before = checkpoint.result("Qwen2_7B")
    after = open_checkpoint(ckpt_path, "resume").result("Qwen2_7B")
    assert before == after == {"curve": [1.5, 2.5], "n": 3}


def test_record_stores_timestamps(ckpt_path: Path) -> None:
    from datetime import UTC, datetime

    checkpoint = open_checkpoint(ckpt_path)
    checkpoint.record("Qwen2_7B", 1.0, started_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    entry = json.loads(ckpt_path.read_text())["results"]["Qwen2_7B"]
    assert entry["started_at"] == "2024-01-02T03:04:05+00:00"
    completed = datetime.fromisoformat(entry["completed_at"])
    assert abs((datetime.now(UTC) - completed).total_seconds()) < 60
    assert checkpoint.completed_at("Qwen2_7B") == entry["completed_at"]


def test_found_block_matches_the_seed_console_format(two_done: Path) -> None:
    said: list[str] = []
    open_checkpoint(two_done, "resume", said=said)
    rule = "=" * 60
    assert said[:5] == [
        rule,
        "Checkpoint found: phase1_aqi_checkpoint.json",
        "Completed models: ['Llama3_8B', 'Mistral_7B']",
        "Pending models: ['Qwen2_7B', 'Gemma2_9B']",
        rule,
    ]


def test_fresh_deletes_the_checkpoint_and_makes_everything_pending(two_done: Path) -> None:
    checkpoint = open_checkpoint(two_done, "fresh")
    assert not two_done.exists()
    assert checkpoint.decision is CheckpointChoice.FRESH
    assert checkpoint.completed == ()
    assert checkpoint.pending == MODELS
    checkpoint.record("Gemma2_9B", 34.3)
    reopened = open_checkpoint(two_done, "resume")
    assert reopened.completed == ("Gemma2_9B",)


def test_skip_summarises_completed_items_and_computes_nothing(two_done: Path) -> None:
    checkpoint = open_checkpoint(two_done, "skip")
    assert checkpoint.decision is CheckpointChoice.SKIP
    assert checkpoint.pending == ()
    assert checkpoint.completed == ("Llama3_8B", "Mistral_7B")
    assert checkpoint.results["Mistral_7B"] == {"aqi": 55.0}
    before = two_done.read_bytes()
    with pytest.raises(CheckpointError, match="--skip"):
        checkpoint.record("Qwen2_7B", 15.0)
    assert two_done.read_bytes() == before


def test_skip_without_a_checkpoint_leaves_nothing_pending(ckpt_path: Path) -> None:
    said: list[str] = []
    checkpoint = open_checkpoint(ckpt_path, "skip", said=said)
    assert checkpoint.pending == ()
    assert checkpoint.completed == ()
    assert any("nothing to summarise" in line for line in said)


def test_settings_mismatch_is_refused_naming_only_the_differing_keys(two_done: Path) -> None:
    changed = {"mode": "full", "n_samples": 100, "layers": [0, 1, 2], "seed": 1}
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(two_done, "resume", settings=changed)
    message = str(excinfo.value)
    assert str(two_done) in message
    assert "mode: 'sanity' -> 'full'" in message
    assert "seed: '<absent>' -> 1" in message
    assert "n_samples" not in message
    assert "layers" not in message
    assert "--fresh" in message
    assert two_done.exists()


def test_settings_mismatch_is_refused_on_skip_and_default_resume(two_done: Path) -> None:
    changed = {**SETTINGS, "n_samples": 500}
    with pytest.raises(CheckpointError, match="n_samples"):
        open_checkpoint(two_done, "skip", settings=changed)
    with pytest.raises(CheckpointError, match="n_samples"):
        open_checkpoint(two_done, None, settings=changed)


def test_settings_mismatch_is_accepted_with_fresh(two_done: Path) -> None:
    changed = {**SETTINGS, "mode": "full"}
    checkpoint = open_checkpoint(two_done, "fresh", settings=changed)
    checkpoint.record("Qwen2_7B", 1.0)
    assert json.loads(two_done.read_text())["settings"]["mode"] == "full"


def test_settings_equal_after_json_are_not_a_mismatch(two_done: Path) -> None:
    same_as_json = {"mode": "sanity", "n_samples": 100, "layers": (0, 1, 2)}
    checkpoint = open_checkpoint(two_done, "resume", settings=same_as_json)
    assert checkpoint.completed == ("Llama3_8B", "Mistral_7B")


def test_settings_difference_is_shown_before_the_prompt(two_done: Path) -> None:
    said: list[str] = []
    ask = ScriptedInput("f")
    open_checkpoint(two_done, ask=ask, terminal=True, said=said, settings={**SETTINGS, "mode": "x"})
    differs = next(i for i, line in enumerate(said) if line.startswith("Settings differ"))
    assert "mode" in said[differs]
    assert differs < said.index("[R] Resume from checkpoint")


def test_corrupt_checkpoint_error_names_the_file_and_suggests_fresh(ckpt_path: Path) -> None:
    ckpt_path.write_text('{"format": "mahals.checkpoint", "results": {')
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint(ckpt_path, "resume")
    assert str(ckpt_path) in str(excinfo.value)
    assert "--fresh" in str(excinfo.value)
    assert ckpt_path.exists()


@pytest.mark.parametrize("content", ["[]", '{"results": {}}', '{"format": "other"}'])
def test_json_that_is_not_a_checkpoint_is_refused(ckpt_path: Path, content: str) -> None:
    ckpt_path.write_text(content)
    with pytest.raises(CheckpointError, match="not a mahals checkpoint"):
        open_checkpoint(ckpt_path, "resume")


def test_corrupt_checkpoint_is_deleted_by_fresh(ckpt_path: Path) -> None:
    ckpt_path.write_text("not json at all")
    checkpoint = open_checkpoint(ckpt_path, "fresh")
    assert not ckpt_path.exists()
    assert checkpoint.decision is CheckpointChoice.FRESH
    assert checkpoint.pending == MODELS


def test_no_terminal_resumes_without_asking(two_done: Path) -> None:
    said: list[str] = []
    checkpoint = open_checkpoint(two_done, None, ask=never_called, terminal=False, said=said)
    assert checkpoint.decision is CheckpointChoice.RESUME
    assert checkpoint.pending == ("Qwen2_7B", "Gemma2_9B")
    assert any(line.startswith("No terminal on stdin: resuming") for line in said)


def test_given_choice_is_used_without_asking_even_on_a_terminal(two_done: Path) -> None:
    checkpoint = open_checkpoint(two_done, "skip", ask=never_called, terminal=True)
    assert checkpoint.decision is CheckpointChoice.SKIP


def test_terminal_prompt_reasks_after_invalid_answer(two_done: Path) -> None:
    said: list[str] = []
    ask = ScriptedInput("x", "", "F")
    checkpoint = open_checkpoint(two_done, None, ask=ask, terminal=True, said=said)
    assert ask.prompts == ["Select option: "] * 3
    assert checkpoint.decision is CheckpointChoice.FRESH
    assert not two_done.exists()
    assert said[5:8] == [
        "[R] Resume from checkpoint",
        "[F] Fresh start (delete checkpoint)",
        "[S] Skip (use cached results)",
    ]
    assert sum(line.startswith("Invalid option") for line in said) == 2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("r", CheckpointChoice.RESUME),
        (" Resume ", CheckpointChoice.RESUME),
        ("S", CheckpointChoice.SKIP),
        ("skip", CheckpointChoice.SKIP),
        ("fresh", CheckpointChoice.FRESH),
    ],
)
def test_terminal_prompt_accepts_letters_and_words(
    two_done: Path, answer: str, expected: CheckpointChoice
) -> None:
    checkpoint = open_checkpoint(two_done, None, ask=ScriptedInput(answer), terminal=True)
    assert checkpoint.decision is expected


def test_end_of_input_at_the_prompt_resumes(two_done: Path) -> None:
    def closed_input(prompt: str) -> str:
        raise EOFError

    checkpoint = open_checkpoint(two_done, None, ask=closed_input, terminal=True)
    assert checkpoint.decision is CheckpointChoice.RESUME
    assert checkpoint.completed == ("Llama3_8B", "Mistral_7B")


def test_results_of_items_outside_the_run_are_kept(two_done: Path) -> None:
    subset = open_checkpoint(two_done, "resume", items=("Qwen2_7B",))
    assert subset.completed == ()
    assert subset.results == {}
    subset.record("Qwen2_7B", 15.0)
    full = open_checkpoint(two_done, "resume")
    assert full.completed == ("Llama3_8B", "Mistral_7B", "Qwen2_7B")


def test_record_refuses_unknown_items_and_non_json_results(ckpt_path: Path) -> None:
    checkpoint = open_checkpoint(ckpt_path)
    with pytest.raises(ValueError, match="Falcon_7B"):
        checkpoint.record("Falcon_7B", 1.0)
    with pytest.raises(TypeError, match="Qwen2_7B"):
        checkpoint.record("Qwen2_7B", {"tensor": object()})
    assert checkpoint.completed == ()
    assert not ckpt_path.exists()


def test_duplicate_items_are_refused(ckpt_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        open_checkpoint(ckpt_path, items=("A", "B", "A"))


def _assert_only_checkpoint_left(directory: Path, ckpt_path: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [ckpt_path.name]


def test_crash_in_rename_keeps_the_old_checkpoint_and_no_temp_file(
    two_done: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = two_done.read_bytes()
    checkpoint = open_checkpoint(two_done, "resume")

    def crash(*args: object) -> None:
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(io_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.record("Qwen2_7B", {"aqi": 15.0})
    monkeypatch.undo()
    assert two_done.read_bytes() == before
    _assert_only_checkpoint_left(two_done.parent, two_done)
    assert open_checkpoint(two_done, "resume").completed == ("Llama3_8B", "Mistral_7B")


def test_crash_while_writing_keeps_the_old_checkpoint_and_no_temp_file(
    two_done: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = two_done.read_bytes()
    checkpoint = open_checkpoint(two_done, "resume")

    def crash(fd: int) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C between write and fsync

    monkeypatch.setattr(io_module.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.record("Qwen2_7B", {"aqi": 15.0})
    monkeypatch.undo()
    assert two_done.read_bytes() == before
    _assert_only_checkpoint_left(two_done.parent, two_done)


def test_atomic_writes_get_the_usual_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    written = atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_flags_parse_to_a_choice() -> None:
    parser = argparse.ArgumentParser()
    add_checkpoint_flags(parser)
    assert parser.parse_args([]).checkpoint_choice is None
    assert parser.parse_args(["--resume"]).checkpoint_choice is CheckpointChoice.RESUME
    assert parser.parse_args(["--fresh"]).checkpoint_choice is CheckpointChoice.FRESH
    assert parser.parse_args(["--skip"]).checkpoint_choice is CheckpointChoice.SKIP
    with pytest.raises(SystemExit):
        parser.parse_args(["--fresh", "--skip"])


def test_stdin_is_terminal_is_false_without_a_usable_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    assert stdin_is_terminal() is False

    class ClosedStdin:
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys, "stdin", ClosedStdin())
    assert stdin_is_terminal() is False


# ------------------------------------------------- per-item result files, the source of truth


def _run_items(out: Path, computed: list[str], *, choice="resume", settings=None, fail_on=None):
    def compute(item: str) -> dict:
        if item == fail_on:
            raise RuntimeError(f"failed on {item}")
        computed.append(item)
        return {"value": len(item), "item": item}

    return run_checkpointed(out_dir=out, checkpoint_name="c.json", items=list(MODELS),
                            settings=settings or SETTINGS, choice=choice, compute=compute,
                            identity=lambda item: {"source": f"hub/{item}"})  # fmt: skip


def _results(run) -> dict:
    return {item: {k: v for k, v in r.items() if k != "seconds"} for item, r in run.results.items()}


def test_each_item_writes_its_result_file_and_the_checkpoint_is_derived_from_them(tmp_path):
    computed: list[str] = []
    first = _run_items(tmp_path, computed)
    for item in MODELS:
        written = json.loads((tmp_path / item / ITEM_RESULT_NAME).read_text())
        assert written["item"] == item and written["settings"] == SETTINGS
        assert written["identity"] == {"source": f"hub/{item}"}
        assert written["result"] == first.results[item]
    (tmp_path / "c.json").unlink()  # the checkpoint is derived: losing it loses nothing
    computed.clear()
    again = _run_items(tmp_path, computed)
    assert computed == [] and again.results == first.results
    assert json.loads((tmp_path / "c.json").read_text())["results"].keys() == set(MODELS)


def test_a_run_stopped_by_an_error_keeps_the_finished_items_and_resumes_after_them(tmp_path):
    computed: list[str] = []
    with pytest.raises(RuntimeError, match="failed on Qwen2_7B"):
        _run_items(tmp_path, computed, fail_on="Qwen2_7B")
    assert computed == ["Llama3_8B", "Mistral_7B"]
    assert not (tmp_path / "Qwen2_7B" / ITEM_RESULT_NAME).exists()
    computed.clear()
    resumed = _run_items(tmp_path, computed)
    assert computed == ["Qwen2_7B", "Gemma2_9B"]
    assert _results(resumed) == _results(_run_items(tmp_path / "whole", []))


def test_an_unreadable_or_foreign_result_file_is_recomputed(tmp_path, caplog):
    _run_items(tmp_path, [])
    (tmp_path / "c.json").unlink()
    (tmp_path / "Llama3_8B" / ITEM_RESULT_NAME).write_text("{half a fi")
    other = json.loads((tmp_path / "Qwen2_7B" / ITEM_RESULT_NAME).read_text())
    other["settings"] = {**SETTINGS, "mode": "full"}
    (tmp_path / "Qwen2_7B" / ITEM_RESULT_NAME).write_text(json.dumps(other))
    computed: list[str] = []
    _run_items(tmp_path, computed)
    assert computed == ["Llama3_8B", "Qwen2_7B"]
    assert "is unreadable" in caplog.text and "other settings" in caplog.text


def test_a_result_file_of_other_inputs_is_recomputed(tmp_path):
    _run_items(tmp_path, [])
    path = tmp_path / "Mistral_7B" / ITEM_RESULT_NAME
    written = json.loads(path.read_text())
    written["identity"] = {"source": "hub/another-model"}
    path.write_text(json.dumps(written))
    computed: list[str] = []
    _run_items(tmp_path, computed)
    assert computed == ["Mistral_7B"]


def test_a_checkpoint_of_an_older_mahals_is_kept_and_gets_its_result_files(tmp_path):
    """Entries recorded before result files existed are not recomputed: their files are
    written from the checkpoint."""
    old = open_checkpoint(tmp_path / "c.json")
    old.record("Llama3_8B", {"value": 9, "item": "Llama3_8B"}, identity={"source": "hub/Llama3_8B"})
    computed: list[str] = []
    run = _run_items(tmp_path, computed)
    assert computed == ["Mistral_7B", "Qwen2_7B", "Gemma2_9B"]
    assert run.results["Llama3_8B"] == {"value": 9, "item": "Llama3_8B"}
    written = json.loads((tmp_path / "Llama3_8B" / ITEM_RESULT_NAME).read_text())
    assert written["result"] == {"value": 9, "item": "Llama3_8B"}
