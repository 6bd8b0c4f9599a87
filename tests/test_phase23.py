"""Phase 2.3 end to end: a tiny Llama pair's vector carried to a tiny Gemma-2 pair and a lone
tiny Falcon (three shapes), checked against independent computations from the files it writes;
kill/resume; the evaluation-row guards; the real SmolLM2 DPO pair → Gemma-3-270M (slow)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_phase2 import model_seed, random_model, registry_document, run_quietly, write_hh_rlhf

from mahals.data import load_hh_rlhf
from mahals.data.splits import row_hash
from mahals.evaluation import EvaluationLeakError
from mahals.models import load_model
from mahals.pipelines import phase23
from mahals.pipelines.phase2 import Phase2Config
from mahals.pipelines.phase23 import Phase23Config, run_phase23
from mahals.registry import load_registry
from mahals.steering import SteeringVector
from mahals.transfer import LayerMapping

from conftest import SHARED_DATA, kill_after_first_checkpoint, partial_writes

XSTEST = SHARED_DATA / "xstest" / "xstest_prompts.csv"
SOURCE, PAIR_TARGET, LONE_TARGET = "Tiny_llama", "Tiny_gemma2", "tiny-falcon-base"
N_EXTRACT = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Tiny models on disk, their registry, hh-rlhf rows and Phase 2.1 vectors of two pairs."""
    root = tmp_path_factory.mktemp("phase23")
    sources = {}
    for architecture in ("llama", "gemma2", "falcon"):
        for role in ("base", "tuned"):
            key = f"tiny-{architecture}-{role}"
            folder = root / "models" / key
            random_model(architecture, model_seed(key)).save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            sources[key] = str(folder)
    (root / "registry.json").write_text(json.dumps(registry_document(sources)))
    registry = load_registry(root / "registry.json")
    data = write_hh_rlhf(root / "hh-rlhf.jsonl", n_good=40)
    run_quietly(
        Phase2Config(mode="custom", n=N_EXTRACT, pairs=(SOURCE, PAIR_TARGET), dataset=str(data),
                     split="test", out_dir=root / "vectors"),
        loader=_loader, registry=registry, tokenizer_loader=lambda spec: tiny_tokenizer,
    )  # fmt: skip
    return root, registry, data


def _loader(spec):
    return load_model(spec.source, device="cpu", verbose=False)


def _config(root: Path, data: Path, out: str, **changes) -> Phase23Config:
    settings = dict(
        source=SOURCE, targets=(PAIR_TARGET, LONE_TARGET), vectors_dir=root / "vectors",
        dataset=str(data), n_eval=4, n_fit=24, xstest=str(XSTEST), aqi_per_cell=5, n_generate=4,
        max_new_tokens=4, lambdas=(4.0,), batch_size=16, out_dir=root / out,
    )  # fmt: skip
    return Phase23Config(**{**settings, **changes})


def _run(config, registry, tiny_tokenizer):
    return run_phase23(config, loader=_loader, registry=registry,
                       tokenizer_loader=lambda spec: tiny_tokenizer)  # fmt: skip


def _stable(path: Path) -> dict:
    summary = json.loads(path.read_text())
    summary.pop("created")
    return summary


@pytest.fixture(scope="module")
def finished(setup, tiny_tokenizer):
    root, registry, data = setup
    return _run(_config(root, data, "whole"), registry, tiny_tokenizer)


def test_items_of_a_run_on_three_architectures(finished):
    summary = _stable(finished.summary_path)
    assert finished.pending == ()
    assert set(summary["agents"]) == {SOURCE, PAIR_TARGET, LONE_TARGET}
    assert set(summary["agents"][SOURCE]["points"]) == {"tuned", "none", "native/lambda_4"}
    sweep = {"projected/lambda_4", "random/lambda_4"}
    assert set(summary["agents"][LONE_TARGET]["points"]) == {"none"} | sweep
    assert set(summary["agents"][PAIR_TARGET]["points"]) == (
        {"tuned", "none", "native/lambda_4"} | sweep
    )
    for name in ("transfer_vs_lambda", "cosine_per_layer", "homophily"):
        assert finished.plots[name].is_file()
    for target in (PAIR_TARGET, LONE_TARGET):
        assert (finished.out_dir / target / "map" / "cka_heatmap.png").is_file()


def test_projection_uses_the_saved_maps_and_depth_matched_layers(finished, setup):
    root, _, _ = setup
    source = SteeringVector.load(root / "vectors" / SOURCE / "steering_vector.safetensors")
    for target, n_layers in ((PAIR_TARGET, 4), (LONE_TARGET, 2)):
        folder = finished.out_dir / target / "map"
        mapping = LayerMapping.load(folder / "mapping.safetensors")
        projected = SteeringVector.load(folder / "projected_vector.safetensors")
        # relative depth, 3 source layers: target block t ↔ round((t + 1) · 3 / n) − 1
        expected = [(int(np.floor((t + 1) * 3 / n_layers + 0.5)) - 1, t) for t in range(n_layers)]
        assert list(mapping.pairs) == expected
        assert projected.layers == tuple(range(n_layers))
        for (s, t), row in zip(mapping.pairs, projected.vectors, strict=True):
            weight = mapping.maps[t].weight.double().numpy()
            reference = source.layer(s).double().numpy() @ weight
            np.testing.assert_allclose(row.double().numpy(), reference, rtol=1e-5, atol=1e-6)
        random = SteeringVector.load(folder / "random_vector.safetensors")
        np.testing.assert_allclose(random.norms().numpy(), projected.norms().numpy(), rtol=1e-5)
        assert torch.all(random.cosine(projected).abs() < 0.9)
        result = json.loads((folder / "result.json").read_text())
        r2 = [m.quality.r2 for m in mapping.maps]
        assert [e["held_out_r2"] for e in result["layers"]] == r2


def test_cosine_to_the_native_vector_is_reported_per_layer(finished, setup):
    root, _, _ = setup
    native = SteeringVector.load(root / "vectors" / PAIR_TARGET / "steering_vector.safetensors")
    projected = SteeringVector.load(
        finished.out_dir / PAIR_TARGET / "map" / "projected_vector.safetensors"
    )
    result = json.loads((finished.out_dir / PAIR_TARGET / "map" / "result.json").read_text())
    for entry in result["layers"]:
        a = projected.layer(entry["target_layer"]).double().numpy()
        b = native.layer(entry["target_layer"]).double().numpy()
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        # SteeringVector.cosine accumulates float32 vectors in float32
        assert entry["cos_projected_native"] == pytest.approx(cosine, abs=1e-6)
        assert 0 <= entry["mean_abs_cos_random_source_native"] <= 1
    lone = json.loads((finished.out_dir / LONE_TARGET / "map" / "result.json").read_text())
    assert not lone["has_native"] and "cos_projected_native" not in lone["layers"][0]


def test_scores_anchor_and_steering_moves_them(finished):
    agents = _stable(finished.summary_path)["agents"]
    pair, lone = agents[PAIR_TARGET]["points"], agents[LONE_TARGET]["points"]
    assert pair["none"]["gap_closure"] == 0.0 and pair["tuned"]["gap_closure"] == 1.0
    assert pair["tuned"]["kl"] == pytest.approx(0.0, abs=1e-6)  # KL(tuned ‖ tuned)
    assert pair["none"]["kl"] > 1e-4  # KL(tuned ‖ base)
    assert lone["none"]["kl"] == pytest.approx(0.0, abs=1e-6)  # a lone model: to itself unsteered
    assert lone["none"]["gap_closure"] is None and lone["projected/lambda_4"]["gap_closure"] is None
    for points in (pair, lone):
        for name in ("projected/lambda_4", "random/lambda_4"):
            assert points[name]["margin"] != points["none"]["margin"], name
            assert points[name]["kl"] > 1e-6, name
    assert pair["native/lambda_4"]["margin"] != pair["none"]["margin"]


def test_homophily_spread_is_the_std_across_agents(finished):
    homophily = _stable(finished.summary_path)["homophily"]
    assert set(homophily["before"]) == {SOURCE, PAIR_TARGET, LONE_TARGET}
    agents = _stable(finished.summary_path)["agents"]
    assert (
        homophily["after"][SOURCE]["margin (nats)"]
        == agents[SOURCE]["points"]["native/lambda_4"]["margin"]
    )
    assert (
        homophily["after"][LONE_TARGET]["margin (nats)"]
        == (agents[LONE_TARGET]["points"]["projected/lambda_4"]["margin"])
    )
    for row in homophily["spread"]:
        before = [homophily["before"][a][row["metric"]] for a in homophily["before"]]
        after = [homophily["after"][a][row["metric"]] for a in homophily["after"]]
        assert row["std_before"] == pytest.approx(np.std(before), abs=1e-12)
        assert row["std_after"] == pytest.approx(np.std(after), abs=1e-12)


def test_map_rows_are_disjoint_from_the_evaluation_rows(finished, setup):
    _, _, data = setup
    summary = _stable(finished.summary_path)
    rows = list(load_hh_rlhf(str(data), split="test", verbose=False))
    by_index = {row.source_index: row for row in rows}
    evaluation = {row_hash(by_index[i]) for i in summary["data"]["eval_source_rows"]}
    fitted = {row_hash(by_index[i]) for i in summary["map_rows"]["source_rows"]}
    assert len(evaluation) == 4 and len(fitted) == 24
    assert not evaluation & fitted
    assert summary["map_rows"]["texts"] == 48


def test_a_native_vector_extracted_on_evaluation_rows_is_refused(setup, finished, tiny_tokenizer):
    root, registry, data = setup
    vectors = root / "leaky_vectors"
    shutil.copytree(root / "vectors", vectors)
    path = vectors / PAIR_TARGET / "steering_vector.safetensors"
    native = SteeringVector.load(path)
    rows = {row.source_index: row for row in load_hh_rlhf(str(data), split="test", verbose=False)}
    evaluation = [
        row_hash(rows[i]) for i in _stable(finished.summary_path)["data"]["eval_source_rows"]
    ]
    leaked = SteeringVector(native.vectors, native.layers, pool=native.pool,
                            extra={**native.extra, "row_sha256": [*native.extra["row_sha256"], evaluation[0]]})  # fmt: skip
    leaked.save(path)
    with pytest.raises(EvaluationLeakError, match=f"1 of 4 evaluation rows.*{PAIR_TARGET} native"):
        _run(_config(root, data, "leak", vectors_dir=vectors), registry, tiny_tokenizer)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="cannot also be a target"):
        Phase23Config(source="a", targets=("a", "b"))
    with pytest.raises(ValueError, match="lambdas must be > 0"):
        Phase23Config(source="a", targets=("b",), lambdas=(0.0, 1.0))
    with pytest.raises(ValueError, match="homophily_lambda 2.0 is not one of"):
        Phase23Config(source="a", targets=("b",), lambdas=(1.0,), homophily_lambda=2.0)


def test_killed_run_resumes_without_recomputing_finished_items(setup, finished, monkeypatch):
    root, _, data = setup
    env = {"MAHALS_REGISTRY": str(root / "registry.json"), "MAHALS_CACHE": str(root / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def arguments(out: Path, *flags: str) -> list[str]:
        return [
            "--source", SOURCE, "--targets", PAIR_TARGET, LONE_TARGET, "--vectors",
            str(root / "vectors"), "--dataset", str(data), "--n-eval", "4", "--n-fit", "24",
            "--xstest", str(XSTEST), "--aqi-per-cell", "5", "--n-generate", "4",
            "--max-new-tokens", "4", "--lambdas", "4", "--batch-size", "16", "--out", str(out),
            *flags,
        ]  # fmt: skip

    interrupted = root / "interrupted"
    checkpoint = interrupted / "phase23_checkpoint.json"
    kill_after_first_checkpoint("phase23", arguments(interrupted), checkpoint, env)
    recorded = json.loads(checkpoint.read_text())["results"]
    assert 0 < len(recorded) < len(finished.results)
    parser = argparse.ArgumentParser()
    phase23.add_arguments(parser)
    config = phase23.config_from_args(parser.parse_args(arguments(interrupted, "--resume")))
    resumed = run_phase23(config, loader=_loader)
    after = json.loads(checkpoint.read_text())["results"]
    for item, entry in recorded.items():
        assert after[item]["completed_at"] == entry["completed_at"], item
    assert resumed.pending == ()
    assert _stable(resumed.summary_path)["agents"] == _stable(finished.summary_path)["agents"]
    assert partial_writes(interrupted) == []


@pytest.mark.slow
def test_real_dpo_pair_vector_carried_to_gemma3(tmp_path):
    """SmolLM2 DPO demo pair (30 × 576) → Gemma-3-270M (18 × 640), small: 16 extraction rows,
    8 evaluation rows, 100 map rows, λ = 1."""
    from mahals.pairs import pair_row_splits
    from mahals.pipelines.demo import phase2_demo_config
    from mahals.pipelines.phase2 import run_phase2

    hh_rlhf = SHARED_DATA / "hh-rlhf"
    vectors = phase2_demo_config(tmp_path / "vectors", hh_rlhf_root=hh_rlhf, n=16)
    run_phase2(vectors)
    config = phase23.demo_config(
        tmp_path / "out", vectors_dir=vectors.out_dir, hh_rlhf_root=hh_rlhf
    )
    config = Phase23Config(**{**vars(config), "n_eval": 8, "n_fit": 100, "lambdas": (1.0,),
                              "homophily_lambda": 1.0, "aqi_per_cell": 5, "n_generate": 4,
                              "max_new_tokens": 4})  # fmt: skip
    summary = _stable(run_phase23(config).summary_path)
    gemma = summary["agents"]["gemma-3-270m"]
    # Gemma's last five blocks at SmolLM2's relative depth (30 layers → 18): hand values
    assert gemma["map"]["pairs"] == [[22, 13], [24, 14], [26, 15], [27, 16], [29, 17]]
    assert all(entry["held_out_r2"] > 0 for entry in gemma["map"]["layers"])
    projected = SteeringVector.load(
        tmp_path / "out" / "gemma-3-270m" / "map" / "projected_vector.safetensors"
    )
    assert projected.vectors.shape == (5, 640) and projected.layers == (13, 14, 15, 16, 17)
    points = gemma["points"]
    assert points["none"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert points["projected/lambda_1"]["kl"] > 1e-4
    splits = pair_row_splits(load_registry().pair("SmolLM2_DPO_demo"))
    rows = {
        row.source_index: row
        for row in load_hh_rlhf(str(hh_rlhf), data_dir="harmless-base", verbose=False)
    }
    held_out = splits.split_of("evaluation")
    assert all(row_hash(rows[i]) in held_out for i in summary["data"]["eval_source_rows"])
    assert not any(row_hash(rows[i]) in held_out for i in summary["map_rows"]["source_rows"])
    assert summary["homophily"]["spread"] is not None
