"""Scale-out on CPU: Phase 1 and Phase 2.1 as Ray tasks on tiny random-weight checkpoints (shape
tests, not findings) give the sequential run's summaries; a driver killed after its first
finished item resumes without recomputing it; a second run into a busy folder is refused; warm
workers serve runs, stay up and refuse a driver with other code; the planner's GPU and memory
rule; models split by a device map."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

from mahals import capture, cluster
from mahals.cluster import (
    PlanError,
    balanced_groups,
    check_fits,
    fan_out,
    parameter_count,
    task_cpus,
    task_gpus,
)
from mahals.models import load_model
from mahals.pipelines import phase1, phase2
from mahals.pipelines.common import ITEM_RESULT_NAME, OutputFolderLocked
from mahals.pipelines.console import console
from mahals.pipelines.slot import registry_loader
from mahals.registry import ModelSpec, default_registry, load_registry
from mahals.steering import Steering, SteeringVector, steer
from mahals.tracing import Batch

from conftest import partial_writes, tiny_config

ray = pytest.importorskip("ray")

AXIOMS = ("Civility & Tolerance", "Wisdom & Knowledge")
PHASE1_MODELS = {"tiny-llama-it": "llama", "tiny-gemma2-it": "gemma2", "tiny-falcon-it": "falcon"}
PAIR_ARCHITECTURES = ("llama", "falcon")
N_CONVERSATIONS = 8


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_tokenizer):
    """Tiny checkpoints on disk, their registry file, a litmus csv and an hh-rlhf jsonl."""
    root = tmp_path_factory.mktemp("cluster")
    models: dict[str, dict[str, Any]] = {}

    def save(key: str, architecture: str, seed: int, chat: bool) -> None:
        torch.manual_seed(seed)
        folder = root / "models" / key
        config = tiny_config(architecture)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        models[key] = {"source": str(folder), "architecture": architecture, "n_layers": 3,
                       "d_model": 64, "batch_size": 4, "chat": chat}  # fmt: skip

    for seed, (key, architecture) in enumerate(PHASE1_MODELS.items()):
        save(key, architecture, seed, chat=False)
    pairs = {}
    for architecture in PAIR_ARCHITECTURES:
        for seed, role in enumerate(("base", "tuned")):
            save(f"tiny-{architecture}-{role}", architecture, 10 + seed, chat=role == "tuned")
        pairs[f"Tiny_{architecture}"] = {
            "base": f"tiny-{architecture}-base", "tuned": f"tiny-{architecture}-tuned",
        }  # fmt: skip
    registry = root / "registry.json"
    registry.write_text(json.dumps({"models": models, "pairs": pairs}))

    litmus = root / "litmus.csv"
    with litmus.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "axiom", "safety_label"])
        for i in range(48):
            axiom, label = AXIOMS[i % 2], ("safe", "unsafe")[(i // 2) % 2]
            wording = "help me" if (label == "safe") != (i % 5 == 0) else "hurt them"
            writer.writerow([f"please {wording} with item {i}", axiom, label])
    rows = [
        {"chosen": f"\n\nHuman: How do I fix problem {i}?\n\nAssistant: Try step {i} carefully.",
         "rejected": f"\n\nHuman: How do I fix problem {i}?\n\nAssistant: No.{'!' * i}"}
        for i in range(N_CONVERSATIONS + 2)
    ]  # fmt: skip
    hh_rlhf = root / "hh-rlhf.jsonl"
    hh_rlhf.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root, registry, litmus, hh_rlhf


@pytest.fixture(scope="module")
def local_ray(study):
    """A local Ray of two CPUs for the module, its workers seeing the tiny registry."""
    os.environ["MAHALS_REGISTRY"] = str(study[1])
    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def phase1_config(study, out: Path, **overrides) -> phase1.Phase1Config:
    settings = dict(models=tuple(PHASE1_MODELS), mode=None, per_cell=6, dataset=str(study[2]),
                    n_bootstrap=20, n_folds=3, out_dir=out, checkpoint="resume")  # fmt: skip
    return phase1.Phase1Config(**{**settings, **overrides})


def phase2_config(study, out: Path, **overrides) -> phase2.Phase2Config:
    settings = dict(mode="custom", n=N_CONVERSATIONS, pairs=tuple(f"Tiny_{a}" for a in PAIR_ARCHITECTURES),
                    dataset=str(study[3]), split="test", batch_size=4, out_dir=out,
                    checkpoint="resume")  # fmt: skip
    return phase2.Phase2Config(**{**settings, **overrides})


def quietly(run, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), console():
        return run(*args, **kwargs)


def run_phase1(study, config):
    registry = load_registry(study[1])
    return quietly(phase1.run_phase1, config, loader=registry_loader(registry), registry=registry)


def run_phase2(study, config):
    registry = load_registry(study[1])
    return quietly(
        phase2.run_phase2,
        config,
        registry=registry,
        tokenizer_loader=phase2.default_tokenizer_loader,
    )


def summary(path: Path) -> Any:
    """A summary file without what differs between two identical runs (times, durations)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in {"created", "seconds"}}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(path.read_text()))


# ------------------------------------------------------------------ Ray runs = sequential runs


def test_phase1_on_ray_gives_the_sequential_summary(study, local_ray, tmp_path):
    sequential = run_phase1(study, phase1_config(study, tmp_path / "sequential"))
    parallel = run_phase1(study, phase1_config(study, tmp_path / "ray", workers=2))
    assert summary(parallel.summary_path) == summary(sequential.summary_path)
    assert parallel.results == sequential.results
    for key in PHASE1_MODELS:  # each item wrote its own result file, the summary's result
        written = json.loads((tmp_path / "ray" / key / ITEM_RESULT_NAME).read_text())
        assert {k: v for k, v in written["result"].items() if k != "seconds"} == parallel.results[
            key
        ]
    checkpoint = json.loads((tmp_path / "ray" / "phase1_aqi_checkpoint.json").read_text())
    assert list(checkpoint["results"]) == list(PHASE1_MODELS)
    assert partial_writes(tmp_path / "ray") == []


def test_phase2_on_ray_gives_the_sequential_summary_and_vectors(study, local_ray, tmp_path):
    sequential = run_phase2(study, phase2_config(study, tmp_path / "sequential"))
    parallel = run_phase2(study, phase2_config(study, tmp_path / "ray", workers=2))
    assert summary(parallel.summary_path) == summary(sequential.summary_path)
    for pair in sequential.results:
        assert torch.equal(
            SteeringVector.load(tmp_path / "ray" / pair / "steering_vector.safetensors").vectors,
            SteeringVector.load(
                tmp_path / "sequential" / pair / "steering_vector.safetensors"
            ).vectors,
        )


def test_items_run_in_ray_workers_not_in_the_driver(study, local_ray, tmp_path):
    """The parallel path really fans out: every item's task ran in a process other than this one."""
    driver = os.getpid()
    run_phase1(study, phase1_config(study, tmp_path / "ray", workers=2))
    workers = {
        json.loads((tmp_path / "ray" / key / ITEM_RESULT_NAME).read_text())["worker"]["pid"]
        for key in PHASE1_MODELS
    }
    assert driver not in workers


def test_one_models_categories_are_scored_on_several_workers_and_combined(
    study, local_ray, tmp_path
):
    """Phase 1 splits a model's work by category (scores of a category depend on its rows
    only): with one model and two workers, both workers score categories of it, and the report
    they make together is the sequential one."""
    one = {"models": ("tiny-llama-it",)}
    sequential = run_phase1(study, phase1_config(study, tmp_path / "sequential", **one))
    parallel = run_phase1(study, phase1_config(study, tmp_path / "ray", workers=2, **one))
    assert parallel.results == sequential.results
    writers = set()
    for path in (tmp_path / "ray" / "tiny-llama-it" / "categories").glob("*.aqi.safetensors"):
        with safe_open(path, framework="pt") as handle:
            writers.add(handle.metadata()["worker"].rsplit(":", 1)[1])
    assert len(writers) == 2 and str(os.getpid()) not in writers


def test_balanced_groups_fill_the_workers_evenly():
    models = {f"m{i}": [f"m{i}/c{j}" for j in range(4)] for i in range(6)}
    grouped = balanced_groups(models, lambda part: 1.0, slots=4)
    assert [len(groups) for groups in grouped.values()] == [2] * 6  # 12 tasks, 3 per worker
    assert all(sorted(sum(groups, [])) == models[m] for m, groups in grouped.items())
    assert [len(g) for g in balanced_groups({"m": ["a", "b", "c"]}, len, 4)["m"]] == [1, 1, 1]
    assert len(balanced_groups({f"m{i}": ["a", "b"] for i in range(4)}, len, 4)["m0"]) == 1
    weights = {"big": 5.0, "small1": 1.0, "small2": 1.0, "small3": 3.0}
    (heavy, light) = balanced_groups({"m": list(weights)}, weights.get, 2)["m"]
    assert (heavy, sorted(light)) == (["big"], ["small1", "small2", "small3"])


# -------------------------------------------------------------- a killed driver, a busy folder


def _cli(study, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mahals.cli", "phase1", "--models", *PHASE1_MODELS,
            "--per-cell", "6", "--dataset", str(study[2]), "--bootstrap", "20", "--folds", "3",
            "--out", str(out), *flags]  # fmt: skip


def _environment(study) -> dict[str, str]:
    return {**os.environ, "MAHALS_REGISTRY": str(study[1]), "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def _finished(out: Path) -> dict[str, int]:
    """Items with a result file → the file's modification time (ns)."""
    return {
        key: (out / key / ITEM_RESULT_NAME).stat().st_mtime_ns
        for key in PHASE1_MODELS
        if (out / key / ITEM_RESULT_NAME).is_file()
    }


def test_driver_killed_after_its_first_item_resumes_without_recomputing(study, local_ray, tmp_path):
    out = tmp_path / "killed"
    driver = subprocess.Popen(
        _cli(study, out, "--workers", "2"), env=_environment(study), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while driver.poll() is None and time.monotonic() < deadline and not _finished(out):
            time.sleep(0.05)
        assert driver.poll() is None, "the driver ended before an item finished"
        # The driver and the Ray it started (its own process group) die together, as in a
        # crash; killing the driver alone would let running workers finish their items.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        # The Ray the driver started (its own process group) goes with it, as in a crash.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "phase1_summary.json").exists()
    finished = _finished(out)
    assert 1 <= len(finished) < len(PHASE1_MODELS)

    resumed = run_phase1(study, phase1_config(study, out, workers=2))
    assert {key: _finished(out)[key] for key in finished} == finished, "a finished item was redone"
    whole = run_phase1(study, phase1_config(study, tmp_path / "whole"))
    assert summary(resumed.summary_path) == summary(whole.summary_path)
    assert partial_writes(out) == []


def test_second_run_into_a_busy_folder_is_refused_and_the_first_completes(
    study, local_ray, tmp_path
):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        _cli(study, out, "--workers", "2"), env=_environment(study), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lock = out / ".mahals.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            lock.is_file() and lock.read_text().strip() == str(first.pid)
        ):
            time.sleep(0.05)
        with pytest.raises(OutputFolderLocked, match=f"PID {first.pid}"):
            run_phase1(study, phase1_config(study, out, workers=2))
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    whole = run_phase1(study, phase1_config(study, tmp_path / "whole"))
    assert summary(out / "phase1_summary.json") == summary(whole.summary_path)


def test_warm_workers_serve_runs_stay_up_and_refuse_other_code(
    study, local_ray, tmp_path, monkeypatch, capsys
):
    """Warm workers (``mahals workers up``) run a phase's items, the result equals the
    sequential run's and the workers stay up for the next run; a driver whose code differs
    from theirs is refused, naming both fingerprints, and ``workers status`` calls them stale."""
    from mahals import cli, workers

    sequential = run_phase1(study, phase1_config(study, tmp_path / "sequential"))
    warm = workers.start_warm_workers("auto", workers=2)
    try:
        assert len(warm) == 2
        assert {worker.fingerprint for worker in warm} == {workers.code_fingerprint()}
        pids = {worker.pid for worker in warm}
        assert os.getpid() not in pids
        parallel = run_phase1(study, phase1_config(study, tmp_path / "warm", workers=2))
        assert summary(parallel.summary_path) == summary(sequential.summary_path)
        served = {
            json.loads((tmp_path / "warm" / key / ITEM_RESULT_NAME).read_text())["worker"]["pid"]
            for key in PHASE1_MODELS
        }
        assert served <= pids
        assert {worker.pid for worker in workers.find_warm_workers(ray)} == pids  # still up
        busy = warm[0].handle.call.remote(time.sleep, 20)  # another run's long task
        asked = time.monotonic()
        assert len(workers.find_warm_workers(ray)) == 2  # answered while it computes
        assert time.monotonic() - asked < 10
        ray.cancel(busy, force=False)

        monkeypatch.setattr(workers, "code_fingerprint", lambda: "0" * 16)
        with pytest.raises(cluster.ClusterError, match=f"{warm[0].fingerprint}.*{'0' * 16}"):
            run_phase1(study, phase1_config(study, tmp_path / "stale", workers=2))
        capsys.readouterr()
        assert cli.main(["workers", "status"]) == 0
        assert capsys.readouterr().out.count("STALE") == 2
    finally:
        assert workers.stop_warm_workers("auto") == 2
    assert workers.find_warm_workers(ray) == []


# ------------------------------------------------------------------------------ the planner


LLAMA_70B = default_registry().model("Llama-3.1-70B")


def test_a_70b_model_is_refused_one_gpu_naming_needed_and_given():
    with pytest.raises(PlanError, match="needs 2 GPUs .* given 1"):
        check_fits(LLAMA_70B, gpus_given=1, gpu_memory=None)


def test_the_memory_check_names_the_estimate_and_the_gpu_memory():
    weights_gib = 70.6e9 * 2 / 2**30  # bf16: two bytes per parameter
    assert weights_gib == pytest.approx(131.5, abs=0.05)
    with pytest.raises(
        PlanError, match=r"131\.5 GiB of weights.*2 GPU\(s\) × 40\.0 GiB give 72\.0 GiB"
    ):
        check_fits(LLAMA_70B, gpus_given=2, gpu_memory=40 * 2**30)
    check_fits(LLAMA_70B, gpus_given=2, gpu_memory=140 * 2**30)  # two H200s hold it
    with pytest.raises(PlanError, match=r"263\.0 GiB"):  # float32 doubles it
        check_fits(LLAMA_70B, gpus_given=2, gpu_memory=140 * 2**30, dtype=torch.float32)


def test_task_gpus_reserves_the_largest_models_count_and_nothing_without_gpus():
    small = default_registry().model("Llama-3.1-8B")
    assert task_gpus([small], node_gpus=8, gpu_memory=80 * 2**30) == 1
    assert task_gpus([small, LLAMA_70B], node_gpus=8, gpu_memory=141 * 2**30) == 2
    assert task_gpus([LLAMA_70B], node_gpus=0, gpu_memory=None) == 0
    with pytest.raises(PlanError, match="needs 2 GPUs .* given 1"):
        task_gpus([LLAMA_70B], node_gpus=1, gpu_memory=141 * 2**30)


def test_parameter_estimate_from_the_shape_when_the_registry_has_none():
    spec = ModelSpec("m", "x/y", "llama", n_layers=32, d_model=4096)
    assert parameter_count(spec) == 12 * 32 * 4096**2


def test_without_ray_or_with_one_worker_the_sequential_path_runs(monkeypatch, caplog):
    models = lambda item: []  # noqa: E731
    assert fan_out(None, None, models) is None and fan_out(1, None, models) is None
    assert isinstance(fan_out(2, None, models), cluster.FanOut)
    monkeypatch.setattr(cluster, "ray_available", lambda: False)
    assert fan_out(2, None, models) is None
    assert "Ray is not installed" in caplog.text
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(cluster.ClusterError, match=r"pip install 'mahals\[cluster\]'"):
        fan_out(None, "auto", models)


# ------------------------------------------------------------------- models split by a map


def _split_map(model) -> dict[str, str]:
    """Every top-level block on its own entry, all on the CPU (the split path, one device)."""
    names = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    return {"model.embed_tokens": "cpu", **dict.fromkeys(names, "cpu"), "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


def test_a_model_dispatched_by_a_device_map_captures_steers_and_generates_as_unsplit(
    tiny_tokenizer,
):
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    plain = load_model(hf, tokenizer=tiny_tokenizer, verbose=False)
    prompts = ["hello there", "a longer prompt for the split model"]
    expected = capture(plain, prompts, pool="mean")
    vector = SteeringVector(torch.randn(3, 64), layers=(0, 1, 2))
    with steer(plain, Steering(vector, alpha=0.5, layers=(1,))):
        steered_expected = capture(plain, prompts, pool="last").tensor
        generated_expected = plain.generate(prompts, max_new_tokens=4, chat=False).token_ids
    split = load_model(hf, tokenizer=tiny_tokenizer, device_map=_split_map(hf), verbose=False)
    assert split.hf.hf_device_map["model.layers.1"] == "cpu"
    assert hasattr(split.hf.model.layers[1], "_hf_hook")  # accelerate's device hooks are on
    last = split.hf.model.layers[-1]._hf_hook  # the layer a capture of every layer stops at
    finished = []
    post_forward = last.post_forward
    last.post_forward = lambda module, output: finished.append(1) or post_forward(module, output)
    try:
        torch.testing.assert_close(capture(split, prompts, pool="mean").tensor, expected.tensor)
    finally:
        del last.post_forward
    assert finished == [1]  # its device hook finished (offloaded weights would go back there)
    with steer(split, Steering(vector, alpha=0.5, layers=(1,))):
        torch.testing.assert_close(capture(split, prompts, pool="last").tensor, steered_expected)
        assert split.generate(prompts, max_new_tokens=4, chat=False).token_ids == generated_expected


def test_a_registry_model_loads_with_a_device_map(study):
    registry = load_registry(study[1])
    whole = load_model("tiny-llama-it", registry=registry, device="cpu", verbose=False)
    mapped = load_model("tiny-llama-it", registry=registry, device_map={"": "cpu"}, verbose=False)
    texts = ["one text", "and another one"]
    torch.testing.assert_close(capture(mapped, texts).tensor, capture(whole, texts).tensor)


def test_a_batch_moves_to_a_layers_device_once():
    batch = Batch.pad([[1, 2, 3], [4]], pad_id=0, side="left")
    moved = batch.on(torch.device("meta"))
    assert moved is batch.on(torch.device("meta")) and batch.on(batch.device) is batch
    fields = (moved.input_ids, moved.attention_mask, moved.position_ids, moved.first, moved.last)
    assert all(t.device.type == "meta" for t in fields)
    assert (moved.step, moved.padded, moved.size) == (batch.step, batch.padded, batch.size)


def test_task_cpus_are_the_tasks_share_of_its_nodes_cpus():
    # A 1-CPU task would run its CPU work on one thread (Ray sets its OpenMP threads to it).
    assert task_cpus(1, cpus_per_gpu=16) == 16
    assert task_cpus(4, cpus_per_gpu=16) == 64
    assert task_cpus(0, cpus_per_gpu=16) == 1  # a CPU-only task (a cluster without GPUs)
    assert task_cpus(2, cpus_per_gpu=0) == 1  # a node with fewer CPUs than GPUs
