"""Phase 2.2 on tiny random pairs: reruns, kill/resume, the evaluation-row guard, and the AQI
invariance of an additive steer at the steered layer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_phase2 import model_seed, random_model, registry_document, run_quietly, write_hh_rlhf

from mahals.activations import capture
from mahals.aqi import evaluate_activations
from mahals.evaluation import EvaluationLeakError
from mahals.models import load_model
from mahals.pipelines import phase22
from mahals.pipelines.phase2 import Phase2Config
from mahals.pipelines.phase22 import Phase22Config, run_phase22
from mahals.registry import load_registry
from mahals.steering import Steering, SteeringVector, steer

from conftest import SHARED_DATA, build_tiny, kill_after_first_checkpoint, partial_writes

XSTEST = SHARED_DATA / "xstest" / "xstest_prompts.csv"
PAIR = "Tiny_llama"
N_EXTRACT = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Tiny pair saved on disk, its registry, hh-rlhf rows and Phase 2.1 vectors."""
    root = tmp_path_factory.mktemp("phase22")
    sources = {}
    for role in ("base", "tuned"):
        key = f"tiny-llama-{role}"
        folder = root / "models" / key
        random_model("llama", model_seed(key)).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        sources[key] = str(folder)
    (root / "registry.json").write_text(json.dumps(registry_document(sources)))
    registry = load_registry(root / "registry.json")
    data = write_hh_rlhf(root / "hh-rlhf.jsonl", n_good=16)
    run_quietly(
        Phase2Config(mode="custom", n=N_EXTRACT, pairs=(PAIR,), dataset=str(data), split="test",
                     out_dir=root / "vectors"),
        loader=_loader, registry=registry, tokenizer_loader=lambda spec: tiny_tokenizer,
    )  # fmt: skip
    return root, registry, data


def _loader(spec):
    return load_model(spec.source, device="cpu", verbose=False)


def _config(root: Path, data: Path, out: str, **changes) -> Phase22Config:
    settings = dict(
        pairs=(PAIR,), vectors_dir=root / "vectors", dataset=str(data), split="test", n_eval=4,
        xstest=str(XSTEST), aqi_per_cell=5, n_generate=4, max_new_tokens=4, lambdas=(0.0, 1.0),
        top_k=16, n_bootstrap=50, reference_aqi=False, batch_size=16, out_dir=root / out,
    )  # fmt: skip
    return Phase22Config(**{**settings, **changes})


def _run(config, registry, tiny_tokenizer):
    return run_phase22(config, loader=_loader, registry=registry,
                       tokenizer_loader=lambda spec: tiny_tokenizer)  # fmt: skip


def _stable(path: Path) -> dict:
    summary = json.loads(path.read_text())
    summary.pop("created")
    return summary


def test_sweep_reruns_are_bit_identical_and_anchor_points_are_exact(setup, tiny_tokenizer):
    root, registry, data = setup
    first = _run(_config(root, data, "one"), registry, tiny_tokenizer)
    second = _run(_config(root, data, "two"), registry, tiny_tokenizer)
    assert _stable(first.summary_path)["pairs"] == _stable(second.summary_path)["pairs"]
    for item in first.results:
        one = json.loads((first.out_dir / item / "result.json").read_text())
        two = json.loads((second.out_dir / item / "result.json").read_text())
        assert one == two, item
        assert (first.out_dir / item / "generations.jsonl").read_text() == (
            second.out_dir / item / "generations.jsonl"
        ).read_text()
    points = _stable(first.summary_path)["pairs"][PAIR]["points"]
    assert set(points) == {
        "tuned/lambda_0",
        "tuned/lambda_1",
        "base/lambda_0",
        "base/lambda_1",
        "base/control_random",
        "base/control_rejected",
        "base/control_svd",
    }
    assert points["base/lambda_0"]["gap_closure"] == 0.0
    assert points["tuned/lambda_0"]["gap_closure"] == 1.0
    assert points["tuned/lambda_0"]["kl_tuned_steered"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert points["base/lambda_0"]["distance_ratio_last_layer"] == 1.0
    assert points["tuned/lambda_0"]["distance_ratio_last_layer"] == pytest.approx(0.0, abs=1e-5)
    for name in ("aqi_vs_lambda.json", "aqi_vs_lambda.png", "behaviour_vs_lambda.png"):
        assert (first.out_dir / PAIR / name).is_file()
    record = _stable(first.summary_path)["data"][PAIR]
    assert record["eval_source_rows"][0] >= N_EXTRACT


def test_sweep_on_ray_workers_equals_the_sequential_sweep(setup, tiny_tokenizer):
    """λ blocks (one pair and side each) as tasks on two Ray workers: the same points, files
    and generations as the sequential run."""
    ray = pytest.importorskip("ray")
    root, registry, data = setup
    sequential = _run(_config(root, data, "seq", controls=("random",)), registry, tiny_tokenizer)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _loader, to the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = _config(root, data, "ray", controls=("random",), workers=2)
        parallel = _run(config, registry, tiny_tokenizer)
    finally:
        ray.shutdown()
    assert _stable(parallel.summary_path)["pairs"] == _stable(sequential.summary_path)["pairs"]
    for item in sequential.results:
        for name in ("result.json", "generations.jsonl"):
            assert (parallel.out_dir / item / name).read_text() == (
                sequential.out_dir / item / name
            ).read_text(), f"{item}/{name}"
        worker = json.loads((parallel.out_dir / item / "item_result.json").read_text())["worker"]
        assert worker["pid"] != os.getpid(), f"{item} ran in the driver"


def test_rows_used_to_extract_are_refused_naming_the_count(setup, tiny_tokenizer):
    root, registry, data = setup
    config = _config(root, data, "leak", exclude_extraction_rows=False, n_eval=10)
    with pytest.raises(EvaluationLeakError, match=f"{N_EXTRACT} of 10 evaluation rows"):
        _run(config, registry, tiny_tokenizer)


def test_killed_sweep_resumes_to_the_uninterrupted_result(setup, tiny_tokenizer, monkeypatch):
    root, registry, data = setup
    env = {"MAHALS_REGISTRY": str(root / "registry.json"), "MAHALS_CACHE": str(root / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def arguments(out: Path, *flags: str) -> list[str]:
        return [
            "--pairs", PAIR, "--vectors", str(root / "vectors"), "--dataset", str(data),
            "--n-eval", "4", "--xstest", str(XSTEST), "--aqi-per-cell", "5", "--n-generate", "4",
            "--max-new-tokens", "4", "--lambdas", "0", "1", "--no-controls",
            "--no-reference-aqi", "--batch-size", "16", "--out", str(out), *flags,
        ]  # fmt: skip

    def run_here(out: Path, *flags: str):
        parser = argparse.ArgumentParser()
        phase22.add_arguments(parser)
        config = phase22.config_from_args(parser.parse_args(arguments(out, *flags)))
        return run_phase22(config, loader=_loader)

    whole = run_here(root / "whole")
    interrupted = root / "interrupted"
    checkpoint = interrupted / "phase22_checkpoint.json"
    kill_after_first_checkpoint("phase22", arguments(interrupted), checkpoint, env)
    assert len(json.loads(checkpoint.read_text())["results"]) < len(whole.results)
    resumed = run_here(interrupted, "--resume")
    assert _stable(resumed.summary_path)["pairs"] == _stable(whole.summary_path)["pairs"]
    assert partial_writes(interrupted) == []


def test_additive_steer_leaves_aqi_unchanged_at_the_steered_layer(tiny_tokenizer):
    model = build_tiny("llama", tiny_tokenizer, seed=5)
    texts, axioms, labels = [], [], []
    for axiom in ("a", "b"):
        for label in ("safe", "unsafe"):
            for i in range(6):
                texts.append(f"{axiom} {label} prompt number {i} {'!' * (i % 3)}")
                axioms.append(axiom)
                labels.append(label)
    vector = SteeringVector(torch.randn(1, model.d_model) * 3, layers=(1,))
    plain = capture(model, texts, pool="mean").tensor
    with steer(model, Steering(vector, alpha=2.0)):
        steered = capture(model, texts, pool="mean").tensor
    shift = 2.0 * vector.vectors[0].double()
    torch.testing.assert_close(
        steered[:, 1].double(), plain[:, 1].double() + shift, rtol=0, atol=1e-4
    )
    # The steered layer in float64: AQI of h + αv equals AQI of h.
    plain64 = plain.double()
    for mode in ("mahalanobis", "geometry"):
        before = evaluate_activations(plain64, axioms, labels, mode=mode, layer=1, n_bootstrap=0)
        after = evaluate_activations(plain64 + shift * torch.tensor([0.0, 1.0, 0.0]).double()[:, None],
                                     axioms, labels, mode=mode, layer=1, n_bootstrap=0)  # fmt: skip
        assert after.overall.aqi == pytest.approx(before.overall.aqi, abs=1e-8), mode
    downstream = evaluate_activations(
        steered, axioms, labels, mode="geometry", layer=2, n_bootstrap=0
    )
    unsteered = evaluate_activations(plain, axioms, labels, mode="geometry", layer=2, n_bootstrap=0)
    assert abs(downstream.overall.aqi - unsteered.overall.aqi) > 1e-3


def _assert_close(one, two, path=""):
    """Equal structure and strings; numbers equal to float32 rounding (the two runs batch
    different rows together, which changes the order of float sums)."""
    if isinstance(one, dict):
        assert one.keys() == two.keys(), path
        for key in one.keys() - {"seconds"}:  # the checkpoint's wall time of the item
            _assert_close(one[key], two[key], f"{path}/{key}")
    elif isinstance(one, list):
        assert len(one) == len(two), path
        for i, (a, b) in enumerate(zip(one, two, strict=True)):
            _assert_close(a, b, f"{path}[{i}]")
    elif isinstance(one, float):
        assert one == pytest.approx(two, rel=1e-4, abs=1e-4), path
    else:
        assert one == two, path


def test_lambda_blocks_in_one_forward_equal_one_lambda_at_a_time(setup, tiny_tokenizer):
    root, registry, data = setup
    lambdas = (-1.0, 0.0, 0.5, 1.0)
    blocked = _run(_config(root, data, "blocked", lambdas=lambdas), registry, tiny_tokenizer)
    single = _run(_config(root, data, "single", lambdas=lambdas, lambdas_per_forward=1),
                  registry, tiny_tokenizer)  # fmt: skip
    assert set(blocked.results) == set(single.results)
    assert len(blocked.results) == 2 * len(lambdas) + 3
    for item in blocked.results:
        _assert_close(blocked.results[item], single.results[item], item)
        assert (blocked.out_dir / item / "generations.jsonl").read_text() == (
            single.out_dir / item / "generations.jsonl"
        ).read_text(), item


def test_controls_can_be_chosen_by_name_and_unknown_names_are_refused(tmp_path):
    from mahals.pipelines.phase22_pair import sweep_points

    def points(controls):
        config = _config(tmp_path, tmp_path / "rows.jsonl", "out", controls=controls)
        return config, [
            p.name for p in sweep_points(config, (3, 4), range(5)) if "control" in p.name
        ]

    config, names = points(("svd", "random"))
    assert config.controls == ("random", "svd") and names == [
        "base/control_random",
        "base/control_svd",
    ]
    assert points(True)[1] == ["base/control_random", "base/control_rejected", "base/control_svd"]
    assert points(False)[1] == []
    with pytest.raises(ValueError, match="controls must be a subset"):
        points(("random", "shuffled"))
