"""Phase 1 end to end on tiny random-weight checkpoints (shape tests, not findings): files in the
seed's layout, numbers equal to an independent recomputation (a fresh capture scored by
``mahals.aqi``), surface baselines, cache reuse and identity, crash and resume."""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers

from mahals import capture
from mahals.aqi import AQIReport, embedding_features, evaluate, evaluate_activations
from mahals.aqi.evaluation import default_sinks
from mahals.data import load_litmus
from mahals.models import load_model
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
            # every fifth text has the other label's wording, so that scores are not all 100
            wording = "help me" if (label == "safe") != (i % 5 == 0) else "hurt them"
            text = f"please {wording} with item {i} of {axiom.split()[0]}"
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


def load(spec):
    return load_model(spec.key, device="cpu", verbose=False)


def capture_by_category(model, dataset, sinks="none"):
    """``capture`` of each category's texts on its own, put back in the dataset's row order."""
    tensor, n_tokens = None, torch.empty(len(dataset), dtype=torch.long)
    for axiom in sorted(set(dataset.axioms)):
        rows = [i for i, a in enumerate(dataset.axioms) if a == axiom]
        part = capture(model, [dataset.texts[i] for i in rows], pool="mean", sinks=sinks)
        if tensor is None:
            tensor = torch.empty((len(dataset), *part.tensor.shape[1:]))
        tensor[rows], n_tokens[rows] = part.tensor, torch.as_tensor(part.n_tokens)
    return argparse.Namespace(tensor=tensor, n_tokens=n_tokens)


def run(cfg, loader=None, *, shown=True):
    """Run Phase 1 with its log shown as the CLI shows it (``shown``) or not configured."""
    loader = loader or load
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
        for name in ("result.json", "metrics_summary.json", "metrics_summary.csv"):
            assert (folder / name).is_file(), f"{key}/{name}"
        # one activation cache and one mahalanobis part per category
        assert len(list((folder / "categories").glob("*.embeddings.safetensors"))) == len(AXIOMS)
        assert len(list((folder / "categories").glob("*.aqi.safetensors"))) == len(AXIOMS)
        # independent path: a fresh model, a fresh sink-free capture of each category's rows
        # (a row's batch holds rows of its category only, as in the run), the library's scorer
        model = load_model(key, device="cpu", verbose=False)
        captured = capture_by_category(model, dataset, sinks="first")
        cached = phase1.cached_embeddings(out, key, dataset)
        assert cached["activations"].shape == (len(dataset), 3, 64)
        torch.testing.assert_close(cached["activations"], captured.tensor, rtol=0, atol=0)
        expected = evaluate_activations(
            captured.tensor,
            dataset.axioms,
            dataset.labels,
            mode="mahalanobis",
            layer="all",
            n_folds=5,
            shrinkage="oas",
            n_tokens=captured.n_tokens,
            baselines={"embedding": embedding_features(model, dataset.texts)},
            n_bootstrap=50,
            seed=42,
        )
        report = AQIReport.from_json(folder / "metrics_summary.json")
        assert report.mode == "mahalanobis"
        assert report.overall.aqi == pytest.approx(expected.overall.aqi, abs=1e-9)
        assert report["Civility & Tolerance"].layer_aqi == pytest.approx(
            expected["Civility & Tolerance"].layer_aqi, abs=1e-9
        )
        result = summary.results[key]
        assert result == json.loads((folder / "result.json").read_text())
        assert result["AQI"] == pytest.approx(expected.overall.aqi, abs=1e-9)
        assert (result["AUC"], result["eta2"]) == pytest.approx(
            (expected.overall.auc, expected.overall.eta2), abs=1e-12
        )
        assert result["per_axiom"] == pytest.approx({a: expected[a].aqi for a in AXIOMS}, abs=1e-9)
        # the surface baselines, scored on the same folds, and the gain over the best of them
        assert set(result["baselines"]) == {"length", "embedding"}
        assert result["baselines"] == pytest.approx(expected.overall.baselines, abs=1e-9)
        best_baseline = max(expected.overall.baselines.values())
        assert result["gain_over_best_baseline"] == pytest.approx(
            expected.overall.aqi - best_baseline, abs=1e-9
        )
        assert (result["CHI_raw"], result["XB_raw"]) == (None, None)
        rows = list(csv.DictReader(io.StringIO((folder / "metrics_summary.csv").read_text())))
        by_category = {row["category"]: row for row in rows}
        assert set(by_category) == {*AXIOMS, "overall"}
        for axiom in AXIOMS:
            row, score = by_category[axiom], expected[axiom]
            assert float(row["AUC"]) == pytest.approx(score.auc, abs=1e-12)
            assert float(row["baseline_length"]) == pytest.approx(score.baselines["length"])
            assert float(row["baseline_embedding"]) == pytest.approx(score.baselines["embedding"])
            assert "CHI_raw" not in row
        assert f"Evaluating: {key}" in console
    best = max(summary.results, key=lambda k: summary.results[k]["AQI"])
    assert summary.baseline_model == best
    on_disk = json.loads(summary.summary_path.read_text())
    assert on_disk["baseline_model"] == best and on_disk["results"] == summary.results
    assert summary.pending == ()
    assert f"BASELINE MODEL: {best}" in console
    assert "Loaded 60 samples" in console
    header = next(line for line in console.splitlines() if line.startswith("Model "))
    assert header.split() == [
        "Model",
        "AQI",
        "95%",
        "CI",
        "AUC",
        "eta2",
        "length",
        "embedding",
        "gain",
    ]
    cells = next(line for line in console.splitlines() if line.startswith(best + " ")).split()
    shown = [float(cells[i]) for i in (1, 3, 4, 5, 6, 7)]
    result = summary.results[best]
    numbers = [result["AQI"], result["AUC"], result["eta2"], *result["baselines"].values()]
    assert shown == pytest.approx([*numbers, result["gain_over_best_baseline"]], abs=0.01)


def test_reference_mode_reproduces_reference_aqi_on_the_cached_embeddings(
    study, registry_env, tmp_path
):
    out = tmp_path / "ref"
    summary, console = run(config(study, out, aqi_mode="reference", models=("tiny-llama-it",)))
    dataset = load_litmus(str(study[2]), per_cell=10, seed=42)
    cached = phase1.cached_embeddings(out, "tiny-llama-it", dataset)["activations"]
    expected = evaluate_activations(
        cached[:, -1], dataset.axioms, dataset.labels, mode="reference", seed=42
    )
    # the original study's plain mean pooling, not the sink-free default of the other modes
    plain = capture_by_category(load_model("tiny-llama-it", device="cpu", verbose=False), dataset)
    torch.testing.assert_close(cached, plain.tensor, rtol=0, atol=0)
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
    parts = {path: path.stat().st_mtime_ns for path in out.glob("*/categories/*.aqi.safetensors")}
    assert len(parts) == len(MODELS) * len(AXIOMS)

    def no_model(spec):
        raise AssertionError(f"loaded {spec.key} although its embeddings are cached")

    second, output = run(config(study, out, checkpoint="fresh"), loader=no_model)
    assert output.count("Reusing cached embeddings") == len(MODELS)
    assert {path: path.stat().st_mtime_ns for path in parts} == parts, "a category was rescored"
    third, output = run(config(study, out, checkpoint="resume"), loader=no_model, shown=False)
    assert third.results == second.results == first.results
    assert output == "", "library code printed although logging was not configured"


def test_cache_identity_includes_the_sink_rule(study, registry_env, tmp_path):
    out = tmp_path / "sinks"
    models = ("tiny-llama-it",)
    run(config(study, out, models=models))
    dataset = load_litmus(str(study[2]), per_cell=10, seed=42)
    sink_free = phase1.cached_embeddings(out, "tiny-llama-it", dataset)
    loaded = []

    def counting(spec):
        loaded.append(spec.key)
        return load(spec)

    _, output = run(
        config(study, out, models=models, sinks="none", checkpoint="fresh"), loader=counting
    )
    assert loaded == ["tiny-llama-it"], "a sink-free cache was reused for plain mean pooling"
    assert "stale (sinks differ)" in output
    plain = phase1.cached_embeddings(out, "tiny-llama-it", dataset)
    assert not torch.allclose(plain["activations"], sink_free["activations"])
    dataset = load_litmus(str(study[2]), per_cell=10, seed=42)
    model = load_model("tiny-llama-it", device="cpu", verbose=False)
    captured = capture(model, list(dataset.texts), pool="mean", sinks="none")
    torch.testing.assert_close(plain["activations"], captured.tensor)
    assert torch.equal(plain["n_tokens"], captured.n_tokens)
    torch.testing.assert_close(plain["embedding"], embedding_features(model, dataset.texts))


def test_pipeline_defaults_are_the_library_defaults():
    library = inspect.signature(evaluate).parameters
    pipeline = phase1.Phase1Config(models=("m",))
    assert pipeline.aqi_mode == library["mode"].default == "mahalanobis"
    assert pipeline.seed == library["seed"].default == 42
    assert pipeline.n_folds == library["n_folds"].default
    assert pipeline.n_bootstrap == library["n_bootstrap"].default
    assert pipeline.layers == "all" and library["layer"].default is None  # None = every layer
    assert pipeline.sinks == default_sinks("mahalanobis") == "first"
    reference = phase1.Phase1Config(models=("m",), aqi_mode="reference")
    assert reference.sinks == default_sinks("reference") == "none"
    assert phase1.Phase1Config(models=("m",), pool="last").sinks == "none"
    with pytest.warns(DeprecationWarning, match="geometry"):
        assert phase1.Phase1Config(models=("m",), aqi_mode="principled").aqi_mode == "geometry"
    with pytest.raises(ValueError, match="pca_dim"):
        phase1.Phase1Config(models=("m",), pca_dim=8)
    with pytest.raises(ValueError, match="pool='mean' only"):
        phase1.Phase1Config(models=("m",), pool="last", sinks="first")


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
    flags = ["--models", "m", "--aqi-mode", "geometry", "--folds", "3", "--sinks", "norm"]
    config = phase1.config_from_args(parser.parse_args(flags))
    assert (config.aqi_mode, config.n_folds, config.sinks) == ("geometry", 3, "norm")
    config = phase1.config_from_args(parser.parse_args(["--models", "m"]))
    assert (config.aqi_mode, config.n_folds, config.sinks) == ("mahalanobis", 5, "first")
    with pytest.warns(DeprecationWarning):
        config = phase1.config_from_args(
            parser.parse_args(["--models", "m", "--aqi-mode", "principled"])
        )
    assert config.aqi_mode == "geometry"
