"""DPO pairs: recipe files, LoRA merging (against peft), preference log-probs (against HF's own
loss), a tiny-config DPO run with trl, and the shipped SmolLM2 pair's validity on held-out rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mahals.data import format_conversation, load_hh_rlhf
from mahals.data.splits import RowOverlapError, row_hash, rows_sha256, split_rows
from mahals.pairs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    DPORecipe,
    LoraSettings,
    answer_log_probs,
    bootstrap_interval,
    evaluate_pair,
    load_recipe,
    merge_lora,
    pair_row_splits,
    preference_margins,
    preference_token_ids,
    select_rows,
    train_dpo,
)
from mahals.registry import load_registry, resolve_resource

from conftest import SHARED_DATA, build_tiny

REPO = Path(__file__).resolve().parents[1]
HARMLESS_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
DEMO_RECIPE = REPO / "recipes" / "smollm2_dpo_demo.json"
needs_data = pytest.mark.skipif(
    not HARMLESS_TEST.is_file(), reason=f"hh-rlhf copy not found at {HARMLESS_TEST}"
)


@pytest.fixture(scope="module")
def harmless():
    return load_hh_rlhf(HARMLESS_TEST, verbose=False)


@pytest.fixture(scope="module")
def short_rows(harmless, tiny_tokenizer):
    """Eight real ASCII rows that fit in 160 tokens of the (ASCII) character tokenizer."""
    fitting = [
        p
        for p in harmless
        if format_conversation(p, "chosen", style="plain").isascii()
        and p.rejected.isascii()
        and preference_token_ids(p, tiny_tokenizer).longest <= 160
    ]
    return fitting[:8]


def tiny_recipe(**changes) -> DPORecipe:
    settings = dict(
        name="tiny",
        base="tiny-llama",
        data=str(HARMLESS_TEST),
        rows=8,
        max_length=160,
        lora=LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj")),
        beta=0.1,
        learning_rate=2e-2,
        epochs=4,
        batch_size=8,
        seed=0,
    )
    return DPORecipe(**{**settings, **changes})


# ------------------------------------------------------------------------------------ recipes


def test_shipped_recipe_parses_and_bad_keys_are_named(tmp_path):
    recipe = load_recipe(DEMO_RECIPE)
    assert recipe.base == "SmolLM2-135M-Instruct" and recipe.lora.r >= 1
    data = json.loads(DEMO_RECIPE.read_text())
    (tmp_path / "typo.json").write_text(json.dumps({**data, "learning_rte": 1e-3}))
    with pytest.raises(ValueError, match=r"typo\.json: unknown recipe keys \['learning_rte'\]"):
        load_recipe(tmp_path / "typo.json")
    del data["beta"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing: \['beta'\]"):
        load_recipe(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="adapter_dtype 'int8'"):
        tiny_recipe(adapter_dtype="int8")


@needs_data
def test_shipped_row_splits_reproduce_from_the_data(harmless):
    recipe = load_recipe(DEMO_RECIPE)
    shipped = pair_row_splits(load_registry().pair("SmolLM2_DPO_demo"))
    again = split_rows(harmless, recipe.split_fractions, seed=recipe.split_seed)
    assert shipped is not None and shipped.hashes == again.hashes
    assert load_registry().pair("SmolLM2_format_demo").row_splits is None


def test_registry_pair_names_the_adapter_and_its_row_splits():
    registry = load_registry()
    pair = registry.pair("SmolLM2_DPO_demo")
    assert (pair.base.key, pair.tuning) == ("SmolLM2-135M-Instruct", "dpo")
    assert pair.tuned.source == pair.base.source and pair.tuned.adapter is not None
    assert Path(resolve_resource(pair.row_splits)).parent == Path(
        resolve_resource(pair.tuned.adapter)
    )


# ------------------------------------------------------------------------------------ merging


def random_peft_adapter(hf_model, folder: Path, *, seed: int = 1, **config) -> Path:
    """Save a peft LoRA adapter for a copy of ``hf_model`` with random (non-zero) A and B."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        copy.deepcopy(hf_model),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], **config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return folder


def test_merge_lora_matches_peft(tiny_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    base = build_tiny("llama", tiny_tokenizer).hf
    for rslora in (False, True):
        folder = random_peft_adapter(base, tmp_path / f"rs{rslora}", use_rslora=rslora)
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
        merged = merge_lora(copy.deepcopy(base), folder)
        ids = tiny_tokenizer(["Hello there, how are you?"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-3)
            torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        for (name, ours), theirs in zip(
            merged.state_dict().items(), reference.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=name)


def test_merge_lora_refuses_what_it_cannot_merge(tiny_tokenizer, tmp_path):
    base = build_tiny("llama", tiny_tokenizer).hf
    folder = random_peft_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="uses \\['DoRA'\\]"):
        merge_lora(copy.deepcopy(base), folder)
    other = build_tiny("qwen2", tiny_tokenizer).hf
    with pytest.raises(FileNotFoundError, match="no such directory"):
        merge_lora(other, tmp_path / "absent")
    plain = random_peft_adapter(base, tmp_path / "plain")
    config = json.loads((plain / ADAPTER_CONFIG_FILE).read_text())
    config["target_modules"] = ["q_proj"]
    (plain / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    mistral = build_tiny("falcon", tiny_tokenizer).hf
    with pytest.raises(ValueError, match="missing from the model"):
        merge_lora(mistral, plain)


# ---------------------------------------------------------------------------- log-probs


@needs_data
def test_answer_log_probs_match_hf_loss_on_unpadded_sequences(short_rows, tiny_tokenizer):
    model = build_tiny("llama", tiny_tokenizer).hf
    rows = short_rows[:5]
    ours = answer_log_probs(model, tiny_tokenizer, rows, batch_size=3)
    for i, pair in enumerate(rows):
        tokens = preference_token_ids(pair, tiny_tokenizer)
        for j, completion in enumerate((tokens.chosen, tokens.rejected)):
            ids = torch.tensor([tokens.prompt + completion])
            labels = ids.clone()
            labels[0, : len(tokens.prompt)] = -100
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss.double()
            assert ours[i, j].item() == pytest.approx(-loss.item() * len(completion), rel=1e-5)
    margins = preference_margins(model, tiny_tokenizer, rows)
    torch.testing.assert_close(margins, ours[:, 0] - ours[:, 1], atol=1e-4, rtol=0)


@needs_data
def test_token_convention_appends_eos_and_splits_at_the_prompt(short_rows, tiny_tokenizer):
    tokens = preference_token_ids(short_rows[0], tiny_tokenizer)
    assert tokens.chosen[-1] == tokens.rejected[-1] == tiny_tokenizer.eos_token_id
    decoded = tiny_tokenizer.decode(tokens.chosen[:-1])
    assert decoded == short_rows[0].chosen


def test_bootstrap_interval_against_the_normal_approximation():
    values = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    mean, low, high = bootstrap_interval(values, n_resamples=4000)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert low < mean < high


@needs_data
def test_evaluate_pair_statistics_kl_and_row_refusal(short_rows, tiny_tokenizer, tmp_path):
    base = build_tiny("llama", tiny_tokenizer).hf
    tuned = merge_lora(copy.deepcopy(base), random_peft_adapter(base, tmp_path / "a"))
    rows = short_rows[:6]
    result = evaluate_pair(base, tuned, tiny_tokenizer, rows, batch_size=4)
    base_margins = preference_margins(base, tiny_tokenizer, rows).numpy()
    tuned_margins = preference_margins(tuned, tiny_tokenizer, rows).numpy()
    assert result.base_accuracy[0] == pytest.approx(np.mean(base_margins > 0))
    assert result.tuned_margin[0] == pytest.approx(tuned_margins.mean(), rel=1e-5)
    assert result.margin_gain[0] == pytest.approx((tuned_margins - base_margins).mean(), rel=1e-5)
    # KL against torch's kl_div on each unpadded chosen answer.
    expected = []
    for pair in rows:
        tokens = preference_token_ids(pair, tiny_tokenizer)
        ids = torch.tensor([tokens.prompt + tokens.chosen])
        span = slice(len(tokens.prompt) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            log_base = base(ids).logits[0, span].double().log_softmax(-1)
            log_tuned = tuned(ids).logits[0, span].double().log_softmax(-1)
        kl = torch.nn.functional.kl_div(log_base, log_tuned, log_target=True, reduction="none")
        expected.append(kl.sum(-1).mean().item())
    assert result.kl[0] == pytest.approx(np.mean(expected), rel=1e-3) and result.kl[0] > 1e-5
    same = evaluate_pair(base, base, tiny_tokenizer, rows[:2])
    assert same.kl[0] == pytest.approx(0, abs=1e-6) and same.margin_gain[0] == 0
    with pytest.raises(RowOverlapError, match="1 of 6 rows"):
        evaluate_pair(base, tuned, tiny_tokenizer, rows, forbidden_hashes={row_hash(rows[3])})


# ---------------------------------------------------------------------------- tiny DPO run


@needs_data
def test_tiny_dpo_run_moves_the_margin_on_its_training_rows(tiny_tokenizer, tmp_path):
    pytest.importorskip("trl")
    model = build_tiny("llama", tiny_tokenizer)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    forward_before = model.hf.forward
    recipe = tiny_recipe()
    result = train_dpo(recipe, tmp_path / "a", model=model, device="cpu")

    # The caller's model comes back as it was: no LoRA layers, same weights, same forward
    # (trl patches the instance's forward while training).
    assert model.hf.forward == forward_before
    after = model.hf.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    # The training rows: the split's first rows that fit, recorded by hash, disjoint from the rest.
    dataset = load_hh_rlhf(HARMLESS_TEST, verbose=False)
    splits = split_rows(dataset, recipe.split_fractions, seed=recipe.split_seed)
    rows, _ = select_rows(
        splits,
        dataset.pairs,
        tiny_tokenizer,
        split="dpo_train",
        rows=recipe.rows,
        max_length=recipe.max_length,
    )
    metadata = json.loads((tmp_path / "a" / "training.json").read_text())
    assert metadata["training_rows_sha256"] == result.training_rows_sha256 == rows_sha256(rows)
    assert metadata["training_row_hashes"] == [row_hash(p) for p in rows]
    assert set(metadata["training_row_hashes"]) <= splits.split_of("dpo_train")
    assert metadata["versions"]["mahals"] and metadata["recipe"] == recipe.to_json()
    assert (tmp_path / "a" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"

    # trl's first logged step sees the untrained policy: its mean log p(chosen) is ours.
    base_sums = answer_log_probs(model.hf, tiny_tokenizer, rows)
    first = result.curve[0]
    assert first["logps/chosen"] == pytest.approx(base_sums[:, 0].mean().item(), rel=1e-4)
    assert first["logps/rejected"] == pytest.approx(base_sums[:, 1].mean().item(), rel=1e-4)

    # Merged from the stored (float16) adapter, the tuned side prefers the chosen answers more.
    tuned = merge_lora(copy.deepcopy(model.hf), tmp_path / "a")
    gain = preference_margins(tuned, tiny_tokenizer, rows) - (base_sums[:, 0] - base_sums[:, 1])
    assert gain.mean() > 0.5, gain
    assert (gain > 0).float().mean() >= 0.75

    # Same seed, same adapter.
    train_dpo(recipe, tmp_path / "b", model=model, device="cpu")
    from safetensors.torch import load_file

    first_adapter = load_file(tmp_path / "a" / ADAPTER_FILE)
    second_adapter = load_file(tmp_path / "b" / ADAPTER_FILE)
    assert all(torch.equal(first_adapter[k], second_adapter[k]) for k in first_adapter)


# ------------------------------------------------------------------------ the shipped pair

SHIPPED = Path(str(resolve_resource("package:adapters/smollm2_dpo_demo")))
needs_adapter = pytest.mark.skipif(
    not (SHIPPED / ADAPTER_FILE).is_file(), reason=f"no adapter shipped at {SHIPPED}"
)


def test_shipped_adapter_is_small_and_recorded():
    if not (SHIPPED / ADAPTER_FILE).is_file():
        pytest.skip(f"no adapter shipped at {SHIPPED}")
    assert (SHIPPED / ADAPTER_FILE).stat().st_size <= 4 * 2**20
    metadata = json.loads((SHIPPED / "training.json").read_text())
    assert metadata["recipe"] == load_recipe(DEMO_RECIPE).to_json()
    assert metadata["n_training_rows"] == len(metadata["training_row_hashes"])


@pytest.mark.slow
@needs_data
@needs_adapter
def test_shipped_pair_prefers_chosen_answers_on_held_out_rows(smollm2):
    from mahals.pairs import evaluation_rows

    rows, splits, _ = evaluation_rows(SHIPPED, smollm2.tokenizer, rows=32, max_length=192)
    tuned = merge_lora(copy.deepcopy(smollm2.hf), SHIPPED)
    result = evaluate_pair(
        smollm2.hf,
        tuned,
        smollm2.tokenizer,
        rows,
        forbidden_hashes=splits.all_except("evaluation"),
        batch_size=8,
    )
    # The shipped pair does NOT raise preference accuracy (measured on 400 held-out rows on an
    # H200: 0.585 -> 0.588, gain CI [-0.010, +0.015]; here 0.5625 = 0.5625), which issue 11 asks
    # for; what it does is raise the margin. This checks it does not lower accuracy.
    assert result.tuned_accuracy[0] >= result.base_accuracy[0]
    assert result.tuned_margin[0] > result.base_margin[0]
    # 32 rows are too few for the paired CI to exclude zero (here about [-1.4, ...]); on 400
    # held-out rows it does: +2.77 [+2.08, +3.48] (benchmarks/results/smollm2_dpo_demo_eval_h200.json).
    assert result.margin_gain[0] > 0, result
    assert result.kl[0] > 1e-4


@pytest.mark.slow
@needs_adapter
def test_load_model_merges_the_registry_adapter(smollm2):
    import mahals

    tuned = mahals.load_model("SmolLM2-135M-DPO-demo", device="cpu")
    name = "model.layers.29.self_attn.q_proj.weight"
    assert not torch.equal(tuned.hf.state_dict()[name], smollm2.hf.state_dict()[name])
