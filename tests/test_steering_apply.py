"""Applying steering vectors (``mahals.steer``) on every adapter architecture, against float64
references and a manual token-by-token greedy decode of a hooked HF model."""

from __future__ import annotations

import warnings

import pytest
import torch

from mahals.activations import capture
from mahals.steering import Steering, SteeringVector, steer
from mahals.tracing import Batch, generate, run_trace

TEXTS = ["Hello there, friend", "Why?", "How do I bake bread?"]


def _vector(model, layers=(1, 2), scale=2.0, seed=0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(layers), model.d_model, generator=generator) * scale
    return SteeringVector(rows, layers=tuple(layers), base_model="tiny", tuned_model="tiny")


def _states(model, texts, **kwargs):
    return [t.double() for t in capture(model, texts, pool="none", **kwargs).per_text]


def _params(model):
    return {name: p.detach().clone() for name, p in model.hf.named_parameters()}


def test_zero_alpha_and_zero_vector_are_bit_identical_and_exit_restores(tiny_model):
    before_params = _params(tiny_model)
    plain = capture(tiny_model, TEXTS, pool="mean").tensor
    plain_gen = generate(
        tiny_model, [tiny_model.tokenizer(t)["input_ids"] for t in TEXTS], max_new_tokens=4
    )
    vector = _vector(tiny_model)
    zero = SteeringVector(torch.zeros_like(vector.vectors), layers=vector.layers)
    for spec in (Steering(vector, alpha=0.0), Steering(zero)):
        with steer(tiny_model, spec):
            assert torch.equal(capture(tiny_model, TEXTS, pool="mean").tensor, plain)
            ids = [tiny_model.tokenizer(t)["input_ids"] for t in TEXTS]
            assert generate(tiny_model, ids, max_new_tokens=4).token_ids == plain_gen.token_ids
    with steer(tiny_model, Steering(vector, alpha=3.0)):
        assert not torch.equal(capture(tiny_model, TEXTS, pool="mean").tensor, plain)
    assert tiny_model.active_interventions == []
    assert torch.equal(capture(tiny_model, TEXTS, pool="mean").tensor, plain)
    after = _params(tiny_model)
    assert all(torch.equal(before_params[name], after[name]) for name in before_params)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_capture_at_a_steered_layer_is_h_plus_alpha_v_at_the_positions(tiny_model, positions):
    vector = _vector(tiny_model, layers=(1,))
    plain = _states(tiny_model, TEXTS)
    with steer(tiny_model, Steering(vector, alpha=0.7, positions=positions)):
        steered = _states(tiny_model, TEXTS, padding_side="left")
    v = vector.vectors[0].double()
    for before, after in zip(plain, steered, strict=True):
        torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)  # layer 0 unchanged
        expected = before[1].clone()
        if positions in ("all", "prompt"):
            expected += 0.7 * v
        else:  # "generated" on a prompt pass: only the last position, which predicts token 1
            expected[-1] += 0.7 * v
        torch.testing.assert_close(after[1], expected, rtol=1e-5, atol=1e-4)


def test_ablate_removes_the_direction_and_preserve_norm_keeps_norms(tiny_model):
    vector = _vector(tiny_model, layers=(2,))
    unit = vector.vectors[0].double() / vector.vectors[0].double().norm()
    plain = _states(tiny_model, TEXTS)
    with steer(tiny_model, Steering(vector, mode="ablate")):
        ablated = _states(tiny_model, TEXTS, layers=[2])
    with steer(tiny_model, Steering(vector, alpha=-1.5, mode="ablate_add")):
        set_to = _states(tiny_model, TEXTS, layers=[2])
    with steer(tiny_model, Steering(vector, alpha=2.0, preserve_norm=True)):
        kept = _states(tiny_model, TEXTS, layers=[2])
    for before, a, s, k in zip(plain, ablated, set_to, kept, strict=True):
        h = before[2]
        assert (a[0] @ unit).abs().max() < 1e-4 * h.norm(dim=-1).max()
        torch.testing.assert_close(a[0], h - (h @ unit)[:, None] * unit, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            s[0] @ unit,
            torch.full_like(s[0] @ unit, -1.5 * vector.vectors[0].double().norm()),
            rtol=1e-4,
            atol=1e-4,
        )
        torch.testing.assert_close(k[0].norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-4)
        shifted = h + 2.0 * vector.vectors[0].double()
        expected = shifted * (h.norm(dim=-1) / shifted.norm(dim=-1))[:, None]
        torch.testing.assert_close(k[0], expected, rtol=1e-5, atol=1e-4)


def test_specs_stack_and_a_trace_stopping_before_the_steered_layer_works(tiny_model):
    vector = _vector(tiny_model, layers=(2,))
    plain = capture(tiny_model, TEXTS, pool="mean", layers=[0, 2]).tensor.double()
    with steer(tiny_model, Steering(vector, alpha=0.5), Steering(vector, alpha=0.25)):
        early = capture(tiny_model, TEXTS, pool="mean", layers=[0]).tensor.double()
        both = capture(tiny_model, TEXTS, pool="mean", layers=[0, 2]).tensor.double()
    torch.testing.assert_close(early[:, 0], plain[:, 0], rtol=0, atol=0)
    expected = plain[:, 1] + 0.75 * vector.vectors[0].double()
    torch.testing.assert_close(both[:, 1], expected, rtol=1e-5, atol=1e-4)


def _reference_greedy(model, ids, vector, layer, alpha, positions, max_new_tokens):
    """Greedy decode one prompt by re-running the full HF forward each step (no KV cache), with
    a torch hook adding alpha * v at the positions the rule names."""
    n_prompt = len(ids)
    row = vector.vectors[vector.layers.index(layer)] * alpha
    sequence = list(ids)
    block = model.adapter.decoder_layers(model.hf)[layer]

    def hook(_m, _i, out):
        hidden = model.adapter.unwrap(out)
        edited = hidden.clone()
        length = hidden.shape[1]
        keep = torch.zeros(length, dtype=torch.bool)
        if positions == "all":
            keep[:] = True
        elif positions == "prompt":
            keep[: min(n_prompt, length)] = True
        else:
            keep[n_prompt - 1 :] = True
        edited[:, keep] += row
        return (edited,) + tuple(out[1:]) if isinstance(out, tuple) else edited

    handle = block.register_forward_hook(hook)
    try:
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = model.hf(input_ids=torch.tensor([sequence]), use_cache=False).logits
            sequence.append(int(logits[0, -1].argmax()))
    finally:
        handle.remove()
    return sequence[n_prompt:]


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_generation_equals_a_manual_token_by_token_reference(tiny_model, positions):
    vector = _vector(tiny_model, layers=(1,), scale=3.0)
    prompts = [tiny_model.tokenizer(t)["input_ids"] for t in TEXTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no nnsight warning may leak
        with steer(tiny_model, Steering(vector, alpha=1.0, positions=positions)):
            batched = generate(tiny_model, prompts, max_new_tokens=5)
            alone = [generate(tiny_model, [ids], max_new_tokens=5).token_ids[0] for ids in prompts]
    assert batched.token_ids == alone
    for ids, tokens in zip(prompts, batched.token_ids, strict=True):
        expected = _reference_greedy(tiny_model, ids, vector, 1, 1.0, positions, 5)
        assert tokens == expected[: len(tokens)]


def test_generated_positions_steer_the_first_generated_token(tiny_model):
    """The first generated token is predicted at the last prompt position: steering only the
    decoding steps would leave it unsteered (the off-by-one of hook-based libraries)."""
    vector = _vector(tiny_model, layers=(1,), scale=6.0)
    prompts = [tiny_model.tokenizer(t)["input_ids"] for t in TEXTS]
    plain = generate(tiny_model, prompts, max_new_tokens=1).token_ids
    with steer(tiny_model, Steering(vector, positions="generated")):
        steered = generate(tiny_model, prompts, max_new_tokens=1).token_ids

    class Recorder:
        """Records layer 2's last position at every forward pass (after the steering)."""

        layers = (2,)

        def __init__(self):
            self.seen = []

        def __call__(self, layer, hidden, batch):
            self.seen.append(hidden[:, -1].double().clone())

        def fingerprint(self):
            return "recorder"

    recorded = {}
    for positions in ("prompt", "all"):
        recorder = Recorder()
        with steer(tiny_model, Steering(vector, positions=positions)):
            interventions = [*tiny_model.active_interventions, recorder]
            generate(tiny_model, prompts, max_new_tokens=3, interventions=interventions)
        recorded[positions] = recorder.seen
    assert steered != plain
    # Prompt pass: both steer every prompt token; decoding steps: only "all" steers.
    torch.testing.assert_close(recorded["prompt"][0], recorded["all"][0])
    assert all(
        (a - b).abs().max() > 1e-3
        for a, b in zip(recorded["prompt"][1:], recorded["all"][1:], strict=True)
    )


def test_shape_mismatch_names_both_shapes(tiny_model):
    wide = SteeringVector(torch.ones(1, tiny_model.d_model + 1), layers=(0,))
    with pytest.raises(
        ValueError, match=rf"shape \(1, {tiny_model.d_model + 1}\).*d_model {tiny_model.d_model}"
    ):
        Steering(wide).bind(tiny_model)
    deep = SteeringVector(torch.ones(1, tiny_model.d_model), layers=(9,))
    with pytest.raises(ValueError, match=rf"layers up to 9.*{tiny_model.n_layers} layers"):
        Steering(deep).bind(tiny_model)
    with pytest.raises(ValueError, match=r"layers \[2\] are not in the steering vector"):
        Steering(_vector(tiny_model, layers=(1,)), layers=[2]).steered_layers()


def test_fingerprint_tracks_every_setting(tiny_model):
    vector = _vector(tiny_model)
    prints = {
        Steering(vector).fingerprint(),
        Steering(vector, alpha=0.5).fingerprint(),
        Steering(vector, positions="prompt").fingerprint(),
        Steering(vector, mode="ablate").fingerprint(),
        Steering(vector, preserve_norm=True).fingerprint(),
        Steering(vector, layers=[1]).fingerprint(),
        Steering(vector * 2).fingerprint(),
    }
    assert len(prints) == 7
    assert Steering(vector).fingerprint() == Steering(vector).fingerprint()


def test_per_block_alpha_equals_one_alpha_at_a_time(tiny_model):
    """Texts run once per row block under alpha=(a0, a1, a2): block j is the scalar alpha=a_j
    run — exactly before the steered layer, to float rounding after it, token for token in
    generation."""
    vector = _vector(tiny_model, layers=(1,), scale=3.0)
    alphas = (-1.0, 0.0, 0.75)
    prompts = [tiny_model.tokenizer(t)["input_ids"] for t in TEXTS]
    n = len(prompts)

    def states(ids):
        batch = Batch.pad(ids, pad_id=0, device="cpu")
        return torch.stack(run_trace(tiny_model, batch, read_layers=[0, 1, 2])[0], dim=1)

    with steer(tiny_model, Steering(vector, alpha=torch.tensor(alphas))):
        blocked = states(prompts * len(alphas))
        generated = generate(tiny_model, prompts * len(alphas), max_new_tokens=5).token_ids
    for j, alpha in enumerate(alphas):
        with steer(tiny_model, Steering(vector, alpha=alpha)):
            alone = states(prompts)
            alone_generated = generate(tiny_model, prompts, max_new_tokens=5).token_ids
        assert generated[j * n : (j + 1) * n] == alone_generated
        torch.testing.assert_close(blocked[j * n : (j + 1) * n, 0], alone[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(blocked[j * n : (j + 1) * n], alone, rtol=1e-5, atol=1e-5)


def test_per_block_alpha_steers_the_rows_of_its_block_and_refuses_a_ragged_batch(tiny_model):
    vector = _vector(tiny_model, layers=(1,))
    plain = _states(tiny_model, TEXTS[:2], layers=[1])
    ids = [tiny_model.tokenizer(TEXTS[0])["input_ids"]] * 2
    with steer(tiny_model, Steering(vector, alpha=(0.0, 2.0))):
        rows = capture(tiny_model, ids, pool="none", layers=[1]).per_text
        with pytest.raises(ValueError, match="3 rows cannot be split into the 2 row blocks"):
            capture(tiny_model, ids + ids[:1], pool="mean", batch_size=3)
    before = generate(tiny_model, ids + ids[:1], max_new_tokens=3).token_ids
    blocks = tiny_model.adapter.decoder_layers(tiny_model.hf)
    hooks = [dict(block._forward_hooks) for block in blocks]
    with (
        steer(tiny_model, Steering(vector, alpha=(0.0, 2.0))),  # generation edits in hooks
        pytest.raises(ValueError, match="3 rows cannot be split into the 2 row blocks"),
    ):
        generate(tiny_model, ids + ids[:1], max_new_tokens=3)
    assert [dict(block._forward_hooks) for block in blocks] == hooks, "a steering hook leaked"
    assert generate(tiny_model, ids + ids[:1], max_new_tokens=3).token_ids == before
    v = vector.vectors[0].double()
    torch.testing.assert_close(rows[0][0].double(), plain[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows[1][0].double(), plain[0][0] + 2.0 * v, rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError, match="alpha"):
        Steering(vector, alpha=("a", 1.0))
    assert (
        Steering(vector, alpha=[0.5, 1.0]).fingerprint()
        != Steering(vector, alpha=[1.0, 0.5]).fingerprint()
    )
