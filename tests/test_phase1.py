"""Phase 1 end to end on tiny random-weight checkpoints (shape tests, not findings): files in the
seed's layout, numbers equal to an independent recomputation, cache reuse, crash and resume."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers

from mahals.aqi import AQIReport, evaluate_activations
from mahals.data import load_litmus
from mahals.io import load_tensors
from mahals.pipelines import phase1
from mahals.pipelines.console import console

from conftest import kill_after_first_checkpoint, partial_writes, tiny_config

AXIOMS = ("Civility & Tolerance", "Wisdom & Knowledge", "Well-being & Peace")
MODELS = {"tiny-llama-it": "llama", "tiny-gemma2-it": "gemma2", "tiny-falcon-it": "falcon"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("phase1")
    models = {}
    for seed, (key, architecture) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        folder = root / "models" / key
        transformers.AutoModelForCausalLM.from_config(tiny_config(architecture)).save_pretrained(
            folder
        )
        tiny_tokenizer.save_pretrained(folder)
        models[key] = {
            "source": str(folder),
            "architecture": architecture,
            "n_layers": 3,
            "d_model": 64,
            "batch_size": 4,
        }
    registry = root / "registry.json"
    registry.write_text(json.dumps({"models": models}))
    data = root / "litmus.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "axiom", "safety_label"])
        for i in range(72):
            axiom, label = AXIOMS[i % 3], ("safe", "unsafe")[(i // 3) % 2]
            text = f"please {'help me' if label == 'safe' else 'hurt them'} with item {i} of {axiom.split()[0]}"
            writer.writerow([text, axiom, label.upper() if i == 5 else label])
    return root, registry, data


def config(study, out: Path, **overrides) -> phase1.Phase1Config:
    _, _, data = study
    settings = dict(
        models=tuple(MODELS), mode=None, per_cell=10, dataset=str(data), n_bootstrap=50, out_dir=out
    )
    return phase1.Phase1Config(**{**settings, **overrides})


@pytest.fixture
def registry_env(study, monkeypatch, tmp_path):
    monkeypatch.setenv("MAHALS_REGISTRY", str(study[1]))
    monkeypatch.setenv("MAHALS_CACHE", str(tmp_path / "cache"))


def run(cfg, loader=None, *, shown=True):
    """Run Phase 1 with its log shown as the CLI shows it (``shown``) or not configured."""
    from mahals.models import load_model

    loader = loader or (lambda spec: load_model(spec.key, device="cpu", verbose=False))
    output = io.StringIO()
    with contextlib.redirect_stdout(output), console() if shown else contextlib.nullcontext():
        summary = phase1.run_phase1(cfg, loader=loader)
    return summary, output.getvalue()


def test_files_numbers_and_console_follow_the_seed(study, registry_env, tmp_path):
    out = tmp_path / "out"
    summary, console = run(config(study, out))
    for name in (
        "phase1_summary.json",
        "phase1_aqi_checkpoint.json",
        "aqi_bar_plot.png",
        "aqi_axiom_heatmap.png",
        "aqi_layer_curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert matplotlib.image.imread(out / name).shape[0] > 100
    dataset = load_litmus(str(study[2]), per_cell=10, seed=42)
    for key in MODELS:
        folder = out / key
        for name in (
            "result.json",
            "metrics_summary.json",
            "metrics_summary.csv",
            f"embeddings_{key}.safetensors",
        ):
            assert (folder / name).is_file(), f"{key}/{name}"
        cached = load_tensors(folder / f"embeddings_{key}.safetensors")["activations"]
        assert cached.shape == (len(dataset), 3, 64)
        expected = evaluate_activations(
            cached, dataset.axioms, dataset.labels, layer="all", n_bootstrap=50, seed=42
        )
        report = AQIReport.from_json(folder / "metrics_summary.json")
        assert report.overall.aqi == expected.overall.aqi
        assert summary.results[key]["AQI"] == expected.overall.aqi
        assert summary.results[key]["per_axiom"] == {a: expected[a].aqi for a in AXIOMS}
        assert f"Evaluating: {key}" in console
    best = max(summary.results, key=lambda k: summary.results[k]["AQI"])
    assert summary.baseline_model == best
    on_disk = json.loads(summary.summary_path.read_text())
    assert on_disk["baseline_model"] == best and on_disk["results"] == summary.results
    assert summary.pending == ()
    assert f"BASELINE MODEL: {best}" in console
    assert "Loaded 60 samples" in console


def test_reference_mode_reproduces_reference_aqi_on_the_cached_embeddings(
    study, registry_env, tmp_path
):
    out = tmp_path / "ref"
    summary, console = run(config(study, out, aqi_mode="reference", models=("tiny-llama-it",)))
    cached = load_tensors(out / "tiny-llama-it" / "embeddings_tiny-llama-it.safetensors")[
        "activations"
    ]
    dataset = load_litmus(str(study[2]), per_cell=10, seed=42)
    expected = evaluate_activations(
        cached[:, -1], dataset.axioms, dataset.labels, mode="reference", seed=42
    )
    result = summary.results["tiny-llama-it"]
    assert (result["AQI"], result["CHI_norm"], result["XB_norm"]) == (
        expected.overall.aqi,
        expected.overall.chi_norm,
        expected.overall.xb_norm,
    )
    assert "CHI_norm" in console and "XB_norm" in console


def test_rerun_reuses_cached_embeddings_without_loading_a_model(study, registry_env, tmp_path):
    out = tmp_path / "cache"
    first, _ = run(config(study, out))

    def no_model(spec):
        raise AssertionError(f"loaded {spec.key} although its embeddings are cached")

    second, output = run(config(study, out, checkpoint="fresh"), loader=no_model)
    assert output.count("Reusing cached embeddings") == len(MODELS)
    third, output = run(config(study, out, checkpoint="resume"), loader=no_model, shown=False)
    assert third.results == second.results == first.results
    assert output == "", "library code printed although logging was not configured"


def test_settings_change_is_refused_on_resume(study, registry_env, tmp_path):
    out = tmp_path / "changed"
    run(config(study, out, models=("tiny-llama-it",)))
    with pytest.raises(Exception, match="n_bootstrap"):
        run(config(study, out, models=("tiny-llama-it",), n_bootstrap=10, checkpoint="resume"))


def test_killed_run_resumes_to_the_uninterrupted_result(study, registry_env, tmp_path):
    whole = tmp_path / "whole"
    whole_summary, _ = run(config(study, whole))
    interrupted = tmp_path / "interrupted"
    checkpoint = interrupted / "phase1_aqi_checkpoint.json"
    args = [
        "--models",
        *MODELS,
        "--per-cell",
        "10",
        "--dataset",
        str(study[2]),
        "--bootstrap",
        "50",
        "--out",
        str(interrupted),
    ]
    kill_after_first_checkpoint("phase1", args, checkpoint, {})
    assert not (interrupted / "phase1_summary.json").exists()
    assert partial_writes(interrupted) == []
    parser = argparse.ArgumentParser()
    phase1.add_arguments(parser)
    resumed = parser.parse_args([*args, "--resume"])
    output = io.StringIO()
    with contextlib.redirect_stdout(output), console():
        assert phase1.run_from_args(resumed) == 0
    assert "Checkpoint found" in output.getvalue()
    resumed_summary = json.loads((interrupted / "phase1_summary.json").read_text())
    assert resumed_summary == json.loads(whole_summary.summary_path.read_text())
    assert partial_writes(interrupted) == []


def test_unknown_labels_are_named(study, registry_env, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("input,axiom,safety_label\nhello,A,safe\nbye,A,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        run(config(study, tmp_path / "bad", dataset=str(bad)))


def test_cli_user_errors_are_one_line_with_exit_status_2(study, registry_env, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    phase1.add_arguments(parser)
    common = ["--per-cell", "10", "--out", str(tmp_path / "out")]
    cases = {
        "unknown model key 'no-such-model'": [
            "--models",
            "no-such-model",
            "--dataset",
            str(study[2]),
        ],
        "no such file": ["--models", "tiny-llama-it", "--dataset", str(tmp_path / "missing.csv")],
        "--layers takes 'all' or layer indices": ["--models", "tiny-llama-it", "--layers", "x"],
    }
    for message, arguments in cases.items():
        assert phase1.run_from_args(parser.parse_args([*arguments, *common])) == 2
        error = capsys.readouterr().err
        assert error.startswith("mahals phase1: error: ") and message in error, error
        assert error.count("\n") == 1 and "Traceback" not in error


def test_config_fields_and_cli_flags_match_phase2():
    from mahals.pipelines import phase2

    shared = {"pool", "layers", "seed", "batch_size", "max_batch_tokens", "use_cache", "out_dir"}
    shared |= {"checkpoint", "progress", "dataset"}
    phase1_fields = set(phase1.Phase1Config.__dataclass_fields__)
    phase2_fields = set(phase2.Phase2Config.__dataclass_fields__)
    assert shared - {"layers"} <= phase1_fields & phase2_fields
    assert "layers" in phase1_fields
    parser = argparse.ArgumentParser()
    phase1.add_arguments(parser)
    args = parser.parse_args(["--models", "m", "--layers", "-1", "-2", "--no-progress", "--fresh"])
    config = phase1.config_from_args(args)
    assert (config.layers, config.progress, config.checkpoint) == ((-1, -2), False, "fresh")
    assert phase1.config_from_args(parser.parse_args(["--models", "m", "--layer", "3"])).layers == 3
