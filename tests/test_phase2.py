"""Phase 2.1 pipeline on tiny random pairs of Llama, Gemma-2 and Falcon shapes (each pair its own
depth and width; base and tuned are two random seeds of one config) and a local hh-rlhf file
with bad rows: vectors against a float64 recomputation, files, caches, one model alive at a
time, checkpoints, and a killed run resumed in a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

from mahals.activations import capture
from mahals.arch import attn_implementation_for
from mahals.data import PreferenceDataError, format_pair_texts, load_hh_rlhf
from mahals.data.splits import row_hash
from mahals.io import load_tensors
from mahals.models import load_model
from mahals.pairs import pair_row_splits
from mahals.pipelines import demo, phase2
from mahals.pipelines.checkpoint import CheckpointChoice
from mahals.pipelines.console import console
from mahals.pipelines.conversations import load_conversations
from mahals.pipelines.phase2 import Phase2Config, run_phase2
from mahals.registry import Registry, load_registry
from mahals.steering import SteeringVector

from conftest import SHARED_DATA, kill_after_first_checkpoint, partial_writes, tiny_config

#: (n_layers, d_model) of each tiny architecture: every pair has its own shape.
SHAPES = {"llama": (3, 64), "gemma2": (4, 48), "falcon": (2, 80)}
TUNING_PAIRS = ("Tiny_llama", "Tiny_gemma2", "Tiny_falcon")
FORMAT_PAIR = "Tiny_format"  # one model read as plain transcript vs chat template (the demo's)
N_SAMPLES = 8
SVD_COMPONENT = 3
#: Bad rows written into the data file, by the drop reason they must be counted under.
BAD_ROWS = {"invalid_json": 1, "missing_key": 1, "no_assistant_turn": 1, "prompt_mismatch": 1}
PER_PAIR_FILES = (
    "steering_vector.safetensors",
    "steering_vector.json",
    "steering_vector_rejected.safetensors",
    "steering_vector_svd3.safetensors",
    "cosine_similarity.png",
    "steering_vector_norms.png",
    "metadata.json",
    "hidden_states_cache/h_base_chosen.safetensors",
    "hidden_states_cache/h_base_rejected.safetensors",
    "hidden_states_cache/h_instruct_chosen.safetensors",
    "hidden_states_cache/h_instruct_rejected.safetensors",
)
RUN_FILES = (
    "phase2_summary.json",
    "phase2_steering_checkpoint.json",
    "cosine_similarity_comparison.png",
    "steering_norms_comparison.png",
    "model_dimensions.png",
)


# ------------------------------------------------------------------------------------ fixtures


def shaped_config(architecture: str) -> transformers.PretrainedConfig:
    """``tiny_config(architecture)`` at this architecture's depth and width from SHAPES."""
    template = tiny_config(architecture)
    n_layers, d_model = SHAPES[architecture]
    values = template.to_dict()
    values.pop("layer_types", None)  # re-derived for the new depth
    values.update(num_hidden_layers=n_layers, hidden_size=d_model)
    return type(template).from_dict(values)


def random_model(architecture: str, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = shaped_config(architecture)
    config._attn_implementation = attn_implementation_for(config.model_type, "sdpa")
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def model_seed(model_key: str) -> int:
    return 0 if model_key.endswith("-base") else 1


def write_hh_rlhf(path: Path, n_good: int = 10) -> Path:
    """A jsonl file of ``n_good`` usable rows (one multi-turn) and one row of each BAD_ROWS kind."""
    lines = []
    for i in range(n_good):
        prompt = f"\n\nHuman: How do I fix problem {i}?"
        if i == 2:
            prompt += "\n\nAssistant: Which one?\n\nHuman: The second."
        row = {
            "chosen": f"{prompt}\n\nAssistant: Try step {i} carefully.",
            "rejected": f"{prompt}\n\nAssistant: No.{'!' * i}",
        }
        lines.append(json.dumps(row))
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}))
    lines.insert(7, json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}))
    lines.insert(
        9,
        json.dumps(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}
        ),
    )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def registry_document(sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Tiny models and pairs; ``sources`` maps model keys to checkpoint folders."""
    models, pairs = {}, {}
    for architecture, (n_layers, d_model) in SHAPES.items():
        for role in ("base", "tuned"):
            key = f"tiny-{architecture}-{role}"
            models[key] = {
                "source": (sources or {}).get(key, f"tiny/{key}"),
                "architecture": architecture,
                "n_layers": n_layers,
                "d_model": d_model,
                "batch_size": 4,
                "chat": role == "tuned",
            }
        pairs[f"Tiny_{architecture}"] = {
            "display_name": f"Tiny {architecture}",
            "base": f"tiny-{architecture}-base",
            "tuned": f"tiny-{architecture}-tuned",
        }
    pairs[FORMAT_PAIR] = {
        "base": "tiny-llama-tuned",
        "tuned": "tiny-llama-tuned",
        "tuning": "format",
        "pairing": "native",
    }
    return {"models": models, "pairs": pairs}


class TrackingLoader:
    """Builds the tiny random model of a spec and records loads, frees and live models."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: list[str] = []
        self.alive: set[int] = set()
        self.max_alive = 0

    def __call__(self, spec):
        self.calls.append(spec.key)
        hf = random_model(spec.architecture, model_seed(spec.key))
        model = load_model(hf, tokenizer=self.tokenizer, device="cpu", verbose=False)
        self.alive.add(id(model))
        self.max_alive = max(self.max_alive, len(self.alive))
        free = model.free

        def tracked_free() -> None:
            self.alive.discard(id(model))
            free()

        model.free = tracked_free
        return model


@dataclass
class Study:
    root: Path
    data: Path
    registry: Registry
    config: Phase2Config
    summary: phase2.Phase2Summary
    loader: TrackingLoader
    tokenizer_loads: list[str]
    console: str

    @property
    def out(self) -> Path:
        return self.config.out_dir


def run_quietly(config: Phase2Config, **kwargs: Any) -> tuple[phase2.Phase2Summary, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), console():
        summary = run_phase2(config, **kwargs)
    return summary, buffer.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_tokenizer) -> Study:
    root = tmp_path_factory.mktemp("phase2")
    data = write_hh_rlhf(root / "hh-rlhf.jsonl")
    (root / "registry.json").write_text(json.dumps(registry_document()))
    registry = load_registry(root / "registry.json")
    config = Phase2Config(
        mode="custom",
        n=N_SAMPLES,
        pairs=(*TUNING_PAIRS, FORMAT_PAIR),
        dataset=str(data),
        split="test",
        svd_component=SVD_COMPONENT,
        out_dir=root / "out",
    )
    loader, tokenizer_loads = TrackingLoader(tiny_tokenizer), []

    def tokenizer_loader(spec):
        tokenizer_loads.append(spec.key)
        return tiny_tokenizer

    summary, console = run_quietly(
        config, loader=loader, registry=registry, tokenizer_loader=tokenizer_loader
    )
    return Study(root, data, registry, config, summary, loader, tokenizer_loads, console)


def cached(folder: Path, role: str, answer: str) -> torch.Tensor:
    return load_tensors(folder / "hidden_states_cache" / f"h_{role}_{answer}.safetensors")[
        "activations"
    ]


def cache_metadata(folder: Path, role: str, answer: str) -> dict[str, str]:
    path = folder / "hidden_states_cache" / f"h_{role}_{answer}.safetensors"
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata())


# --------------------------------------------------------------------------------------- tests


def test_every_pair_gets_layer_by_width_vectors_and_all_files(study):
    for name in RUN_FILES:
        assert (study.out / name).is_file(), name
    for key, architecture in zip(TUNING_PAIRS, SHAPES, strict=True):
        n_layers, d_model = SHAPES[architecture]
        folder = study.out / key
        for name in PER_PAIR_FILES:
            assert (folder / name).is_file(), f"{key}/{name}"
        for layer in range(n_layers):
            assert (folder / f"explained_variances/layer_{layer}_explained_variance.png").is_file()
        assert not (
            folder / f"explained_variances/layer_{n_layers}_explained_variance.png"
        ).exists()
        for name in ("steering_vector", "steering_vector_rejected", "steering_vector_svd3"):
            vector = SteeringVector.load(folder / f"{name}.safetensors")
            assert vector.vectors.shape == (n_layers, d_model)
            assert vector.layers == tuple(range(n_layers))
            assert vector.n_samples == N_SAMPLES and vector.pool == "last"
        assert cached(folder, "base", "chosen").shape == (N_SAMPLES, n_layers, d_model)
        result = study.summary.results[key]
        assert (result["n_layers"], result["d_model"]) == (n_layers, d_model)
        assert len(result["cosine_chosen"]) == len(result["norms_rejected"]) == n_layers
    on_disk = json.loads((study.out / "phase2_summary.json").read_text())
    assert list(on_disk["pairs"]) == [*TUNING_PAIRS, FORMAT_PAIR]
    assert on_disk["settings"]["n"] == N_SAMPLES and on_disk["pending"] == []


def test_vectors_cosines_and_svd_match_a_float64_recomputation(study):
    for key in (*TUNING_PAIRS, FORMAT_PAIR):
        folder, result = study.out / key, study.summary.results[key]
        h = {
            (role, answer): cached(folder, role, answer).double()
            for role in ("base", "instruct")
            for answer in ("chosen", "rejected")
        }
        for answer, name in (
            ("chosen", "steering_vector"),
            ("rejected", "steering_vector_rejected"),
        ):
            reference = (h["instruct", answer] - h["base", answer]).mean(0)
            saved = SteeringVector.load(folder / f"{name}.safetensors").vectors.double()
            torch.testing.assert_close(saved, reference, rtol=1e-6, atol=1e-7)
            assert result[f"norms_{answer}"] == pytest.approx(
                reference.norm(dim=-1).tolist(), rel=1e-5
            )
            cosines = torch.nn.functional.cosine_similarity(
                h["instruct", answer], h["base", answer], dim=-1
            ).mean(0)
            assert result[f"cosine_{answer}"] == pytest.approx(cosines.tolist(), abs=1e-12)
            assert result[f"cosine_{answer}_mean"] == pytest.approx(
                float(cosines.mean()), abs=1e-12
            )

        differences = (h["instruct", "chosen"] - h["base", "chosen"]).transpose(0, 1)  # [L, n, d]
        mean = differences.mean(1)
        _, centered_values, right = torch.linalg.svd(
            differences - mean[:, None], full_matrices=False
        )
        component = right[:, SVD_COMPONENT]
        expected = component * torch.sign((component * mean).sum(-1))[:, None]
        svd_vector = SteeringVector.load(folder / "steering_vector_svd3.safetensors").vectors
        svd_vector = svd_vector.double()
        below_rank = centered_values[:, SVD_COMPONENT] <= 1e-6 * centered_values[:, 0]
        assert result["svd_component_null_layers"] == below_rank.nonzero().flatten().tolist()
        assert torch.all(svd_vector[below_rank] == 0)
        kept = ~below_rank
        torch.testing.assert_close(
            svd_vector[kept].norm(dim=-1), mean[kept].norm(dim=-1), rtol=1e-5, atol=0
        )
        unit = svd_vector[kept] / svd_vector[kept].norm(dim=-1, keepdim=True)
        assert torch.all((unit * expected[kept]).sum(-1) > 0.9999), f"{key}: wrong direction/sign"

        singular_values = torch.linalg.svdvals(differences)
        assert result["dsteer_singular_value_ratio"] == pytest.approx(
            (singular_values[:, 1] / singular_values[:, 0]).tolist(), rel=1e-4, abs=1e-6
        )
        _, _, uncentered = torch.linalg.svd(differences, full_matrices=False)
        alignment = (uncentered[:, 0] * mean).sum(-1).abs() / mean.norm(dim=-1)
        assert result["dsteer_top_direction_alignment"] == pytest.approx(
            alignment.tolist(), rel=1e-4
        )


def test_a_layer_without_per_sample_variation_is_reported_not_hidden(study):
    """Gemma-2's layer 0 attends within a sliding window of 8 tokens and every chosen text ends
    in the same 8 characters, so its per-sample differences are equal (up to rounding): the
    centered SVD has no component 3 there, and the run says so instead of saving noise."""
    assert study.summary.results["Tiny_gemma2"]["svd_component_null_layers"] == [0]
    assert "component 3 is below the numerical rank of the centered differences at layers [0]" in (
        study.console
    )
    assert all(
        study.summary.results[key]["svd_component_null_layers"] == [] for key in TUNING_PAIRS[::2]
    )


def test_cached_states_are_the_right_model_answer_and_order(study, tiny_tokenizer):
    """The cache holds base/tuned states of chosen/rejected texts in input order: a fresh
    capture of the same texts reproduces each block (a swap of roles or answers would not)."""
    folder = study.out / "Tiny_llama"
    dataset = load_hh_rlhf(study.data, split="test", n=N_SAMPLES, verbose=False)
    for role, key in (("base", "tiny-llama-base"), ("instruct", "tiny-llama-tuned")):
        hf = random_model("llama", model_seed(key))
        model = load_model(hf, tokenizer=tiny_tokenizer, device="cpu", verbose=False)
        for answer in ("chosen", "rejected"):
            texts = format_pair_texts(dataset, "shared-template", tiny_tokenizer, answer)
            fresh = capture(model, texts, pool="last", batch_size=8, progress=False).tensor
            torch.testing.assert_close(cached(folder, role, answer), fresh, rtol=1e-4, atol=1e-5)
        model.free()


def test_one_model_is_resident_at_a_time_and_each_is_loaded_once(study):
    assert study.loader.max_alive == 1
    assert not study.loader.alive, "a model was not freed"
    expected = [f"tiny-{arch}-{role}" for arch in SHAPES for role in ("base", "tuned")]
    assert study.loader.calls == [*expected, "tiny-llama-tuned"]  # the format pair: one load
    assert study.tokenizer_loads == [f"tiny-{arch}-tuned" for arch in SHAPES] + ["tiny-llama-tuned"]


def test_format_pair_reads_two_formats_of_one_model_and_says_so(study):
    folder = study.out / FORMAT_PAIR
    base_meta = cache_metadata(folder, "base", "chosen")
    instruct_meta = cache_metadata(folder, "instruct", "chosen")
    assert base_meta["pairing"] == instruct_meta["pairing"] == "native"
    assert base_meta["texts_sha256"] != instruct_meta["texts_sha256"]
    assert base_meta["model_key"] == instruct_meta["model_key"] == "tiny-llama-tuned"
    assert (base_meta["role"], instruct_meta["role"]) == ("base", "tuned")
    vector = SteeringVector.load(folder / "steering_vector.safetensors")
    assert float(vector.norms().min()) > 0
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["vector_meaning"].startswith("FORMAT vector, not a tuning vector")
    assert "NOTE: FORMAT vector, not a tuning vector" in study.console
    assert "[1/4] BASE side (plain transcript) - chosen responses..." in study.console
    shared = json.loads((study.out / "Tiny_llama" / "metadata.json").read_text())
    assert shared["pairing"] == "shared-template" and shared["tokenization_mismatches"] == 0
    assert shared["vector_meaning"].startswith("instruct tuning vector")


def test_bad_rows_are_counted_and_reported(study):
    for key in (*TUNING_PAIRS, FORMAT_PAIR):
        data = json.loads((study.out / key / "metadata.json").read_text())["data"]
        assert data["dropped_by_reason"] == BAD_ROWS
        assert data["rows_read"] == 10 + sum(BAD_ROWS.values())
        assert data["n_samples"] == N_SAMPLES
    summary = json.loads((study.out / "phase2_summary.json").read_text())
    assert summary["data"]["rows_dropped"] == sum(BAD_ROWS.values())
    assert "14 rows: 10 kept, 4 dropped (invalid_json 1" in study.console


def test_console_follows_the_seed(study):
    console = study.console
    for line in (
        "Phase 2: Extract Steering Vectors (D_STEER)",
        f"Mode: custom | Samples: {N_SAMPLES}",
        "SVD: Enabled (component 3)",
        "Cache: Enabled",
        f"Models: {[*TUNING_PAIRS, FORMAT_PAIR]}",
        f"Extracted {N_SAMPLES} valid samples",
        "Extracting: Tiny gemma2",
        "[1/4] BASE model - chosen responses...",
        "[4/4] INSTRUCT model - rejected responses...",
        f"Hidden states shape: torch.Size([{N_SAMPLES}, 4, 48])",
        "Shape of h_delta (chosen): torch.Size([2, 80])",
        "SVD steering vector shape: torch.Size([3, 64])",
        "PHASE 2 RESULTS: Steering Vectors Extracted (D_STEER)",
        "Generating Steering Vector Plots",
    ):
        assert line in console, line
    result = study.summary.results["Tiny_gemma2"]
    assert f"Mean cosine similarity (chosen): {result['cosine_chosen_mean']:.4f}" in console
    assert f"Norm of h_delta (chosen): {result['norm_chosen']:.4f}" in console
    table_row = next(line for line in console.splitlines() if line.startswith("Tiny_gemma2 "))
    assert table_row.split() == [
        "Tiny_gemma2", "4", "48",
        f"{result['cosine_chosen_mean']:.4f}", f"{result['cosine_rejected_mean']:.4f}",
    ]  # fmt: skip


def test_resume_does_nothing_fresh_reuses_the_cache_and_a_stale_cache_is_recomputed(
    study, tmp_path, tiny_tokenizer
):
    out = tmp_path / "out"
    shutil.copytree(study.out, out)
    vector_files = sorted(out.glob("*/steering_vector*.safetensors"))
    stamps = {path: path.stat().st_mtime_ns for path in vector_files}
    kwargs = {"registry": study.registry}

    def no_tokenizer(spec):
        raise AssertionError(f"tokenizer of {spec.key} loaded on a resume with nothing to do")

    loader = TrackingLoader(tiny_tokenizer)
    resumed, console = run_quietly(
        phase2.Phase2Config(
            **{**vars(study.config), "out_dir": out, "checkpoint": CheckpointChoice.RESUME}
        ),
        loader=loader,
        tokenizer_loader=no_tokenizer,
        **kwargs,
    )
    assert loader.calls == []
    assert {path: path.stat().st_mtime_ns for path in vector_files} == stamps
    assert resumed.results == study.summary.results
    assert "Loading" not in console

    pairs = ("Tiny_llama", "Tiny_falcon")
    fresh_config = Phase2Config(
        **{
            **vars(study.config),
            "out_dir": out,
            "pairs": pairs,
            "checkpoint": CheckpointChoice.FRESH,
        }
    )
    loader = TrackingLoader(tiny_tokenizer)
    run_quietly(fresh_config, loader=loader, tokenizer_loader=lambda spec: tiny_tokenizer, **kwargs)
    assert loader.calls == [], "a fresh start with a valid cache ran a forward pass"
    for key in pairs:
        metadata = json.loads((out / key / "metadata.json").read_text())
        assert set(metadata["cache"].values()) == {"reused"}
        again = SteeringVector.load(out / key / "steering_vector.safetensors").vectors
        before = SteeringVector.load(study.out / key / "steering_vector.safetensors").vectors
        assert torch.equal(again, before)
        assert (out / key / "steering_vector.safetensors").stat().st_mtime_ns != stamps[
            out / key / "steering_vector.safetensors"
        ]

    mean_config = Phase2Config(**{**vars(fresh_config), "pairs": ("Tiny_llama",), "pool": "mean"})
    loader = TrackingLoader(tiny_tokenizer)
    _, console = run_quietly(
        mean_config, loader=loader, tokenizer_loader=lambda spec: tiny_tokenizer, **kwargs
    )
    assert loader.calls == ["tiny-llama-base", "tiny-llama-tuned"]
    assert "is stale (pool differ)" in console
    assert cache_metadata(out / "Tiny_llama", "base", "chosen")["pool"] == "mean"
    mean_vector = SteeringVector.load(out / "Tiny_llama" / "steering_vector.safetensors")
    last_vector = SteeringVector.load(study.out / "Tiny_llama" / "steering_vector.safetensors")
    assert mean_vector.pool == "mean"
    assert not torch.allclose(mean_vector.vectors, last_vector.vectors)

    other_data = tmp_path / "other.jsonl"
    other_data.write_text(study.data.read_text().replace("carefully", "gently"))
    other_config = Phase2Config(
        **{**vars(fresh_config), "pairs": ("Tiny_falcon",), "dataset": str(other_data)}
    )
    loader = TrackingLoader(tiny_tokenizer)
    _, console = run_quietly(
        other_config, loader=loader, tokenizer_loader=lambda spec: tiny_tokenizer, **kwargs
    )
    assert loader.calls == ["tiny-falcon-base", "tiny-falcon-tuned"]
    assert "h_base_chosen.safetensors is stale (texts_sha256 differ)" in console


def test_no_usable_rows_is_a_clear_error_before_any_model_loads(tmp_path, tiny_tokenizer, study):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"chosen": "no turns", "rejected": "no turns"}\n{broken\n')
    loader = TrackingLoader(tiny_tokenizer)
    config = Phase2Config(
        mode="custom", n=N_SAMPLES, pairs=("Tiny_llama",), dataset=str(data), split="test",
        out_dir=tmp_path / "out",
    )  # fmt: skip
    with pytest.raises(PreferenceDataError, match="no usable preference pairs.*invalid_json 1"):
        run_quietly(config, loader=loader, registry=study.registry)
    assert loader.calls == []


def test_cli_arguments_and_config_validation(tmp_path):
    parser = argparse.ArgumentParser()
    phase2.add_arguments(parser)
    args = parser.parse_args(
        ["--mode", "full", "--pairs", "Llama3_8B", "Gemma2_9B", "--no-cache", "--token", "mean",
         "--svd-component", "2", "--pairing", "plain", "--batch-size", "4", "--out", str(tmp_path),
         "--dataset", "data/hh", "--data-dir", "harmless-base", "--split", "test", "--fresh"]
    )  # fmt: skip
    config = phase2.config_from_args(args)
    assert (config.n_samples, config.mode_label, config.pairs) == (
        1000, "full", ("Llama3_8B", "Gemma2_9B"),
    )  # fmt: skip
    assert (config.use_cache, config.pool, config.svd_component, config.pairing) == (
        False, "mean", 2, "plain",
    )  # fmt: skip
    assert config.checkpoint is CheckpointChoice.FRESH and config.out_dir == tmp_path
    defaults = phase2.config_from_args(parser.parse_args([]))
    assert (defaults.n_samples, defaults.pairs, defaults.checkpoint) == (100, None, None)
    assert defaults.out_dir == Path("outputs/phase2_steering_vectors")
    custom = phase2.config_from_args(
        parser.parse_args(["--n", "7", "--seed", "3", "--pool", "mean", "--no-progress"])
    )
    assert (custom.n_samples, custom.mode_label) == (7, "custom")
    assert (custom.seed, custom.pool, custom.progress, defaults.seed) == (3, "mean", False, None)
    with pytest.raises(ValueError, match="needs at least 5 samples"):
        Phase2Config(n=4)
    assert phase2.run_from_args(parser.parse_args(["--n", "2"])) == 2


def test_demo_preset_is_the_offline_dpo_pair_on_its_extraction_rows(tmp_path):
    root = SHARED_DATA / "hh-rlhf"
    if not (root / "harmless-base").is_dir():
        pytest.skip(f"offline hh-rlhf copy not found at {root}")
    config = demo.phase2_demo_config(tmp_path / "demo", hh_rlhf_root=root)
    assert config.pairs == ("SmolLM2_DPO_demo",)
    pair = load_registry().pair(config.pairs[0])
    assert pair.base != pair.tuned and pair.tuning == "dpo" and pair.row_splits is not None
    splits = pair_row_splits(pair)
    dataset, record = load_conversations(
        config.dataset, data_dir=config.data_dir, split=config.split, n=config.n_samples,
        max_chars=config.max_chars, min_rows=5, extraction_splits={config.pairs[0]: splits},
    )  # fmt: skip
    assert record["row_split"] == "vector_extraction" and len(dataset) == config.n_samples
    used = {row_hash(row) for row in dataset}
    assert used <= splits.split_of("vector_extraction")
    assert not used & splits.all_except("vector_extraction")
    assert (config.data_dir, config.split) == ("harmless-base", "test")
    assert config.dataset == str(root.resolve())
    assert config.n_samples <= 64 and config.out_dir == tmp_path / "demo"
    with pytest.raises(FileNotFoundError, match="no offline hh-rlhf copy"):
        demo.phase2_demo_config(tmp_path, hh_rlhf_root=tmp_path / "missing")


# ------------------------------------------------------------------------- crash and resume


def _without_volatile(value: Any) -> Any:
    """``value`` without timestamps and durations (they differ between two identical runs)."""
    if isinstance(value, dict):
        return {
            k: _without_volatile(v)
            for k, v in value.items()
            if k not in {"created", "seconds", "started", "finished"}
        }
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_tokenizer, monkeypatch):
    """A CLI run killed (SIGKILL) after its first pair is checkpointed, then resumed, ends with
    the summary and vectors of an uninterrupted run, and no partial file is left behind. The
    kill happens in a subprocess; the uninterrupted run and the resume run in this process
    (same code path from CLI arguments on, CPU, same thread count)."""
    sources = {}
    for architecture in ("llama", "falcon"):
        for role in ("base", "tuned"):
            key = f"tiny-{architecture}-{role}"
            folder = tmp_path / "models" / key
            random_model(architecture, model_seed(key)).save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            sources[key] = str(folder)
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps(registry_document(sources)))
    data = write_hh_rlhf(tmp_path / "hh-rlhf.jsonl")
    settings = {"MAHALS_REGISTRY": str(registry_file), "MAHALS_CACHE": str(tmp_path / "cache")}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)

    def arguments(out: Path, *flags: str) -> list[str]:
        return [
            "--pairs", "Tiny_llama", "Tiny_falcon", "--n", str(N_SAMPLES), "--dataset", str(data),
            "--split", "test", "--batch-size", "4", "--out", str(out), *flags,
        ]  # fmt: skip

    def run_here(out: Path, *flags: str) -> None:
        parser = argparse.ArgumentParser()
        phase2.add_arguments(parser)
        config = phase2.config_from_args(parser.parse_args(arguments(out, *flags)))
        run_quietly(config, loader=lambda spec: load_model(spec.key, device="cpu", verbose=False))

    whole = tmp_path / "whole"
    run_here(whole)

    interrupted = tmp_path / "interrupted"
    checkpoint = interrupted / "phase2_steering_checkpoint.json"
    kill_after_first_checkpoint("phase2", arguments(interrupted), checkpoint, settings)
    assert list(json.loads(checkpoint.read_text())["results"]) == ["Tiny_llama"]
    assert not (interrupted / "phase2_summary.json").exists()
    # What a kill in the middle of an atomic write leaves (the kill above may or may not have).
    (interrupted / "Tiny_falcon").mkdir(exist_ok=True)
    (interrupted / "Tiny_falcon" / ".steering_vector.safetensors.k1ll3d.tmp").write_bytes(b"x")
    (interrupted / ".phase2_summary.json.k1ll3d.tmp").write_bytes(b"{")

    run_here(interrupted, "--resume")
    resumed_summary = json.loads((interrupted / "phase2_summary.json").read_text())
    whole_summary = json.loads((whole / "phase2_summary.json").read_text())
    assert list(resumed_summary["pairs"]) == ["Tiny_llama", "Tiny_falcon"]
    assert _without_volatile(resumed_summary) == _without_volatile(whole_summary)
    assert partial_writes(interrupted) == []
    for key in ("Tiny_llama", "Tiny_falcon"):
        assert torch.equal(
            SteeringVector.load(interrupted / key / "steering_vector.safetensors").vectors,
            SteeringVector.load(whole / key / "steering_vector.safetensors").vectors,
        )


# ------------------------------------------------------------------- model slot and console


def test_model_slot_holds_one_model_and_reloads_only_on_change(caplog, tmp_path):
    from mahals.pipelines.slot import ModelSlot

    (tmp_path / "registry.json").write_text(json.dumps(registry_document()))
    registry = load_registry(tmp_path / "registry.json")
    llama, falcon = registry.model("tiny-llama-base"), registry.model("tiny-falcon-base")
    events: list[str] = []

    class FakeModel:
        def __init__(self, key: str) -> None:
            self.key = key

        def free(self) -> None:
            events.append(f"free {self.key}")

    def loader(spec):
        events.append(f"load {spec.key}")
        return FakeModel(spec.key)

    caplog.set_level("INFO", logger="mahals")
    with ModelSlot(loader) as slot:
        first = slot.get(llama, announce="BASE model")
        assert slot.get(llama) is first
        slot.get(falcon)
    assert events == [
        "load tiny-llama-base", "free tiny-llama-base", "load tiny-falcon-base",
        "free tiny-falcon-base",
    ]  # fmt: skip
    assert caplog.messages == ["  Loading BASE model: tiny/tiny-llama-base"]


def test_console_shows_mahals_records_as_bare_lines_only_inside_the_block():
    import logging

    log = logging.getLogger("mahals.pipelines.phase2")
    shown, later = io.StringIO(), io.StringIO()
    with console(shown):
        log.info("Mode: %s", "sanity")
        logging.getLogger("elsewhere").warning("not ours")
    with contextlib.redirect_stdout(later):
        log.info("after the block")
    assert shown.getvalue() == "Mode: sanity\n"
    assert later.getvalue() == ""
