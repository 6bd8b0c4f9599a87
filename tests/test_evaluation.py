"""mahals.evaluation against float64 references computed with the plain HF forward."""

from __future__ import annotations

import pytest
import torch

from mahals.data.hh_rlhf import PreferencePair, Turn
from mahals.evaluation import (
    EvaluationLeakError,
    bootstrap_mean,
    check_disjoint_rows,
    gap_closure,
    is_refusal,
    kl_to_reference,
    perplexity,
    preference_margins,
    reference_top_k,
    refusal_log_odds,
    refusal_token_ids,
    repetition_rate,
    row_hash,
    scored_texts,
)
from mahals.steering import Steering, SteeringVector, steer

from conftest import build_tiny

PROMPTS = ["[user] How do I bake bread?\n[assistant] ", "[user] Hi\n[assistant] ", "Q: 2+2?\nA:"]
CHOSEN = ["Mix flour and water.", "Hello! How can I help?", " 4"]
REJECTED = ["No.", "Go away", " five, maybe, or so"]


@pytest.fixture(scope="module", params=["llama", "falcon"])
def model(request, tiny_tokenizer):
    return build_tiny(request.param, tiny_tokenizer, seed=3)


def _manual_log_prob(model, prompt: str, answer: str) -> float:
    """Float64 reference: the HF model run in float64 on prompt ids + answer ids."""
    tok = model.tokenizer
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    return _manual_ids_log_prob(model, p, a)


def _manual_ids_log_prob(model, p: list[int], a: list[int]) -> float:
    ids = torch.tensor([p + a])
    hf64 = model.hf.to(torch.float64)
    try:
        with torch.no_grad():
            logp = hf64(input_ids=ids).logits[0].log_softmax(-1)
    finally:
        model.hf.to(torch.float32)
    return sum(float(logp[len(p) - 1 + i, token]) for i, token in enumerate(a))


def _manual_distributions(model, prompt: str, answer: str) -> torch.Tensor:
    tok = model.tokenizer
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([p + a])).logits[0].double()
    return logits[len(p) - 1 : len(p) + len(a) - 1].log_softmax(-1)


def test_preference_margin_equals_a_float64_log_prob_computation(model):
    scores = preference_margins(model, PROMPTS, CHOSEN, REJECTED, batch_size=2)
    for i in range(len(PROMPTS)):
        chosen = _manual_log_prob(model, PROMPTS[i], CHOSEN[i])
        rejected = _manual_log_prob(model, PROMPTS[i], REJECTED[i])
        assert scores.chosen[i].item() == pytest.approx(chosen, abs=2e-4)
        assert scores.margins[i].item() == pytest.approx(chosen - rejected, abs=4e-4)
    expected = float((scores.margins > 0).double().mean())
    assert scores.accuracy == expected


def test_margin_is_steered_inside_a_steer_block(model):
    plain = preference_margins(model, PROMPTS, CHOSEN, REJECTED).chosen
    vector = SteeringVector(torch.randn(1, model.d_model) * 5, layers=(1,))
    with steer(model, Steering(vector, alpha=1.0)):
        steered = preference_margins(model, PROMPTS, CHOSEN, REJECTED).chosen
    assert not torch.allclose(plain, steered)


def test_kl_to_reference_with_the_full_vocabulary_equals_the_float64_kl(model, tiny_tokenizer):
    texts = scored_texts(model, PROMPTS, CHOSEN)
    other = build_tiny(model.architecture, tiny_tokenizer, seed=11)
    reference = reference_top_k(other, texts, k=model.hf.config.vocab_size, batch_size=2)
    kl = kl_to_reference(model, texts, reference, batch_size=2)
    for i in range(len(PROMPTS)):
        ref = _manual_distributions(other, PROMPTS[i], CHOSEN[i])
        own = _manual_distributions(model, PROMPTS[i], CHOSEN[i])
        expected = (ref.exp() * (ref - own)).sum(-1).mean()
        assert kl[i].item() == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert torch.all(kl_to_reference(other, texts, reference).abs() < 1e-6)
    # A top-k cut is a coarser partition: its KL is a lower bound of the full one.
    cut = kl_to_reference(model, texts, reference_top_k(other, texts, k=5))
    assert torch.all(cut <= kl + 1e-9) and torch.all(cut >= 0)


def test_perplexity_and_refusal_log_odds_match_manual_computations(model):
    texts = ["The cat sat on the mat.", "Rain falls."]
    nll, count = 0.0, 0
    for text in texts:
        ids = model.tokenizer(text)["input_ids"]
        nll -= _manual_ids_log_prob(model, ids[:1], ids[1:])
        count += len(ids) - 1
    assert perplexity(model, texts) == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)

    prompt = model.tokenizer("Tell me a secret")["input_ids"]
    with torch.no_grad():
        logp = model.hf(input_ids=torch.tensor([prompt])).logits[0, -1].double().log_softmax(-1)
    p_refusal = logp[refusal_token_ids(model)].exp().sum()
    expected = torch.log(p_refusal / (1 - p_refusal))
    score = refusal_log_odds(model, [prompt, prompt[:3]])
    assert score[0].item() == pytest.approx(expected.item(), abs=1e-4)


def test_refusal_classifier_follows_xstest_prefixes():
    assert is_refusal("  I'm sorry, but I can't help with that.")
    assert is_refusal("As an AI, I do not kill processes.")
    assert is_refusal("No, that is not possible.")
    assert not is_refusal("Sure! To kill a Python process, run kill PID.")
    assert not is_refusal("Nobody knows.")  # "no" must be followed by , or .


def test_repetition_rate_counts_repeated_ngrams():
    assert repetition_rate([[1, 2, 3, 4, 5]], n=2) == 0.0
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(3 / 5)
    assert repetition_rate([[7, 7, 7], [1, 2]], n=2) == pytest.approx(1 / 3)


def test_bootstrap_interval_and_gap_closure():
    values = torch.arange(100, dtype=torch.float64)
    interval = bootstrap_mean(values, n_bootstrap=2000, seed=0)
    assert interval.mean == pytest.approx(49.5)
    assert interval.low < 49.5 < interval.high
    standard_error = values.std().item() / 10
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert gap_closure(2.0, 1.0, 3.0) == 0.5
    assert gap_closure(1.0, 1.0, 3.0) == 0.0


def _pair(i: int) -> PreferencePair:
    return PreferencePair((Turn("user", f"question {i}"),), f"good {i}", f"bad {i}", source_index=i)


def test_row_guard_refuses_overlapping_rows_and_names_the_count():
    extraction = [row_hash(_pair(i)) for i in range(10)]
    # The same conversation read from elsewhere hashes alike.
    moved = PreferencePair(_pair(3).prompt_turns, "good 3", "bad 3", source_index=999)
    evaluation = [row_hash(_pair(i)) for i in range(10, 20)]
    check_disjoint_rows(evaluation, extraction)
    with pytest.raises(EvaluationLeakError, match="2 of 12 evaluation rows"):
        check_disjoint_rows(evaluation + [row_hash(moved), extraction[7]], extraction)
