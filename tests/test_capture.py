"""Conformance of capture across architectures, against HF ``output_hidden_states`` and float64
references computed independently of mahals (plain HF forward passes, one text at a time)."""

from __future__ import annotations

import re

import pytest
import torch

from mahals.activations import HUGE_PAGE_BYTES, _stack_on, capture, host_result
from mahals.arch import ADAPTERS, check_adapter

from conftest import WritesNothing

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "How do I bake bread at home without yeast?",
    "Tell me a story about a robot that learns to paint, in three sentences.",
    "ok",
    "What is the boiling point of water at the top of Mount Everest?",
    "A",
    "Refuse politely.",
    "Summarise the plot of Hamlet.",
]


_REFERENCE_CACHE: dict[tuple[int, str, str], tuple[object, torch.Tensor]] = {}


def _cached(kind: str):
    def decorate(fn):
        def wrapper(model, text):
            # The entry keeps its model alive: a freed model's id can be reused by the next one
            # (pytest tears down each parametrised session fixture before building the next).
            key = (id(model.hf), kind, text)
            if key not in _REFERENCE_CACHE:
                _REFERENCE_CACHE[key] = (model.hf, fn(model, text))
            return _REFERENCE_CACHE[key][1]

        return wrapper

    return decorate


@_cached("hidden_states")
def hf_states(model, text: str) -> torch.Tensor:
    """HF hidden states of one unpadded text: ``[L + 1, tokens, d]`` float64 (index 0 = embeddings)."""
    enc = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.hf(**enc, output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].double()


@_cached("last_block")
def hf_last_block_output(model, text: str) -> torch.Tensor:
    """Output of the last decoder layer via a plain torch hook: ``[tokens, d]`` float64."""
    seen = []
    layer = model.adapter.decoder_layers(model.hf)[-1]
    handle = layer.register_forward_hook(
        lambda _m, _i, out: seen.append(model.adapter.unwrap(out).clone())
    )
    try:
        with torch.no_grad():
            model.hf(**model.tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen[0][0].double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=rel * scale)


def test_adapter_table_matches_live_models(tiny_model):
    adapter = check_adapter(tiny_model.hf)
    assert adapter is ADAPTERS[tiny_model.config.model_type]
    assert tiny_model.architecture == tiny_model.config.model_type


def test_pool_none_equals_hf_hidden_states(tiny_model):
    acts = capture(tiny_model, TEXTS[:3], pool="none", batch_size=3)
    for i, text in enumerate(TEXTS[:3]):
        states = hf_states(tiny_model, text)
        ours = acts.per_text[i]
        assert ours.shape == (tiny_model.n_layers, states.shape[1], tiny_model.d_model)
        for layer in range(tiny_model.n_layers - 1):
            assert_close(ours[layer], states[layer + 1])
        # HF's last hidden state is taken after the final norm; mahals' last layer is the
        # block output before it: both the hook reference and norm(ours) must agree.
        assert_close(ours[-1], hf_last_block_output(tiny_model, text))
        final_norm = tiny_model.hf.get_submodule(tiny_model.adapter.final_norm)
        with torch.no_grad():
            assert_close(final_norm(ours[-1].float()), states[-1])


@pytest.mark.parametrize("pool", ["mean", "last", "first"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pooling_matches_float64_reference(tiny_model, pool, padding_side):
    acts = capture(tiny_model, TEXTS, pool=pool, batch_size=4, padding_side=padding_side)
    assert acts.tensor.shape == (len(TEXTS), tiny_model.n_layers, tiny_model.d_model)
    assert acts.tensor.dtype == torch.float32 and acts.tensor.device.type == "cpu"
    for i, text in enumerate(TEXTS):
        blocks = hf_states(tiny_model, text)[1:].clone()
        blocks[-1] = hf_last_block_output(tiny_model, text)
        expected = {"mean": blocks.mean(1), "last": blocks[:, -1], "first": blocks[:, 0]}[pool]
        assert_close(acts.tensor[i], expected)
    assert acts.n_tokens.tolist() == [len(tiny_model.tokenizer(t)["input_ids"]) for t in TEXTS]


def test_batch_size_and_padding_side_do_not_change_results(tiny_model):
    one = capture(tiny_model, TEXTS, batch_size=1).tensor
    seven = capture(tiny_model, TEXTS, batch_size=7, padding_side="left").tensor
    # Different batch shapes take different matmul paths, so equality is to float32 rounding.
    assert_close(seven, one, rel=1e-5)


def test_layer_subset_and_negative_indices(tiny_model):
    full = capture(tiny_model, TEXTS[:4], batch_size=2)
    sub = capture(tiny_model, TEXTS[:4], layers=[-1, 0], batch_size=2)
    assert sub.layers == (0, tiny_model.n_layers - 1)
    torch.testing.assert_close(sub.tensor[:, 0], full.tensor[:, 0])
    torch.testing.assert_close(sub.at_layer(-1), full.tensor[:, -1])


def test_pretokenised_and_padded_mappings_match_texts(tiny_model):
    tok = tiny_model.tokenizer
    from_texts = capture(tiny_model, TEXTS[:4], pool="last")
    ids = [tok(t)["input_ids"] for t in TEXTS[:4]]
    from_ids = capture(tiny_model, ids, pool="last")
    mixed = [torch.tensor(ids[0]), tuple(ids[1]), *ids[2:]]
    from_mixed = capture(tiny_model, mixed, pool="last")
    tok.padding_side = "left"
    padded = tok(TEXTS[:4], padding=True, return_tensors="pt")
    from_mapping = capture(tiny_model, dict(padded), pool="last")
    torch.testing.assert_close(from_ids.tensor, from_texts.tensor)
    torch.testing.assert_close(from_mixed.tensor, from_texts.tensor)
    assert_close(from_mapping.tensor, from_texts.tensor, rel=1e-5)


def test_chat_inputs_use_the_template(tiny_model):
    tok = tiny_model.tokenizer
    messages = [[{"role": "user", "content": t}] for t in TEXTS[:2]]
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in messages]
    via_chat = capture(tiny_model, messages, pool="mean")
    via_strings = capture(tiny_model, TEXTS[:2], chat=True, pool="mean")
    reference = capture(
        tiny_model, [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
    )
    torch.testing.assert_close(via_chat.tensor, reference.tensor)
    torch.testing.assert_close(via_strings.tensor, reference.tensor)


def test_bad_inputs_are_named(tiny_model):
    with pytest.raises(ValueError, match="empty list"):
        capture(tiny_model, [])
    with pytest.raises(IndexError, match=r"layers \[7\] out of range .* 3 layers"):
        capture(tiny_model, TEXTS[:1], layers=[0, 7])
    with pytest.raises(ValueError, match=r"rows \[1\] are empty"):
        capture(tiny_model, ["fine", "   "])
    with pytest.raises(TypeError, match="not one string"):
        capture(tiny_model, "a single string")
    # Without beartype the ValueError names the pool; under the test-time type checker the
    # Literal annotation rejects it first.
    with pytest.raises((ValueError, TypeError), match="max"):
        capture(tiny_model, TEXTS[:1], pool="max")


def test_batch_plan_sorts_by_length_and_respects_both_caps():
    from mahals.activations import plan_batches

    lengths = [5, 40, 12, 40, 3, 25, 7, 100]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=80)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 80
    assert [len(b) for b in plan_batches(lengths, batch_size=3)] == [3, 3, 2]


def test_token_budget_does_not_change_results(tiny_model):
    budgeted = capture(tiny_model, TEXTS, batch_size=8, max_batch_tokens=60).tensor
    assert_close(budgeted, capture(tiny_model, TEXTS, batch_size=1).tensor, rel=1e-5)


def _huge_page_kb(address: int) -> int:
    """``AnonHugePages`` of the mapping of this process that holds ``address`` (kB)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                inside = int(span[1], 16) <= address < int(span[2], 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise LookupError(f"no mapping holds {address:#x}")


def _transparent_huge_pages() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def test_a_large_result_lives_on_huge_pages_and_outlives_its_mapping_object():
    """A result of at least one huge page is float32, contiguous, starts on a huge-page
    boundary and is backed by huge pages once written (where the kernel offers them); it keeps
    its memory after every other reference to it is gone. A smaller one is a plain tensor."""
    import gc

    shape = (40, 4, 8192)  # 5 MiB: two whole huge pages and a part
    result = host_result(shape)
    assert result.shape == shape and result.dtype == torch.float32 and result.is_contiguous()
    assert result.data_ptr() % HUGE_PAGE_BYTES == 0
    numbers = torch.arange(result.numel(), dtype=torch.float32).view(shape)
    result.numpy()[:] = numbers.numpy()
    gc.collect()
    assert torch.equal(result, numbers)
    if _transparent_huge_pages():
        assert _huge_page_kb(result.data_ptr()) >= HUGE_PAGE_BYTES // 1024
    small = host_result((3, 2, 4))
    assert small.shape == (3, 2, 4) and small.dtype == torch.float32


def test_a_result_is_made_when_the_kernel_refuses_huge_pages(monkeypatch):
    """A kernel built without transparent huge pages refuses the advice (EINVAL, as for any
    advice it does not know): the result is made on ordinary pages all the same."""
    import mmap

    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 12345, raising=False)  # no such advice
    result = host_result((40, 4, 8192))
    result.fill_(2.0)
    assert result.shape == (40, 4, 8192) and float(result.sum()) == 2.0 * result.numel()


def test_held_reads_come_stacked_once(tiny_model):
    """Reads that one reduction made (every read layer held) carry that stacked tensor, which
    the capture takes as it is; reads made layer by layer (a writer puts one in a trace body)
    carry none and are stacked."""
    from mahals.activations import pooling_reader
    from mahals.tracing import Batch, run_trace

    ids = [tiny_model.tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    batch = Batch.pad(ids, pad_id=0, device=tiny_model.device)
    layers = list(range(tiny_model.n_layers))
    reader = pooling_reader("mean")
    reads, _ = run_trace(tiny_model, batch, read_layers=layers, reader=reader, interventions=())
    body_read, _ = run_trace(
        tiny_model, batch, read_layers=layers, reader=reader,
        interventions=[WritesNothing(1)],
    )  # fmt: skip
    if tiny_model.adapter.adds_in_place:  # Falcon: no layer is held
        assert reads.stacked is None
    else:
        assert reads.stacked is not None
        assert _stack_on(reads, batch.device) is reads.stacked
    assert body_read.stacked is None
    for got in (reads, body_read):
        torch.testing.assert_close(_stack_on(got, batch.device), torch.stack(list(got), 1))
    torch.testing.assert_close(_stack_on(reads, batch.device), _stack_on(body_read, batch.device))


class _Fill:
    """Sets every value of the residual stream at ``layer`` to ``value``."""

    def __init__(self, layer: int, value: float) -> None:
        self.layers, self.value = (layer,), value

    def __call__(self, layer, hidden, batch):
        hidden.fill_(self.value)

    def fingerprint(self) -> str:
        return f"fill-{self.layers}-{self.value}"


class _NanInRowsWith:
    """Writes NaN at ``layer`` into every row whose tokens include ``token``."""

    def __init__(self, layer: int, token: int) -> None:
        self.layers, self.token = (layer,), token

    def __call__(self, layer, hidden, batch):
        rows = (batch.input_ids == self.token).any(-1)
        hidden[rows] = float("nan")

    def fingerprint(self) -> str:
        return f"nan-{self.layers}-{self.token}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("staging_bytes", "landing_bytes", "steps"),
    [(1 << 30, 64 << 20, [5, 1]), (1 << 30, 1, [1] * 6), (1, 1, [1] * 6)],
    ids=["lands-before-the-last-batch", "lands-per-batch-on-a-thread", "buffer-reused-per-batch"],
)
def test_cuda_capture_equals_cpu_capture_and_names_non_finite_rows(
    tiny_tokenizer, monkeypatch, staging_bytes, landing_bytes, steps
):
    """Batches staged in pinned memory on CUDA land in input order (on the helper thread in a
    step before the last batch, then that batch; batch by batch, reusing the buffer or not; a
    single batch in the calling thread): equal to the CPU capture of the same weights; a NaN is
    named by its layers and input rows; finite values whose sum overflows are no error."""
    import mahals.activations

    from conftest import build_tiny

    monkeypatch.setattr(mahals.activations, "STAGING_BYTES", staging_bytes)
    monkeypatch.setattr(mahals.activations, "LANDING_BYTES", landing_bytes)
    model = build_tiny("llama", tiny_tokenizer)
    texts = [" ".join(["word"] * (1 + i % 7)) + f" text {i}" for i in range(23)]
    want = capture(model, texts, pool="mean", batch_size=4).tensor
    huge = _Fill(1, 5e36)  # each batch's sum overflows float32: checked on the host, no error
    want_huge = capture(model, texts, layers=[1], batch_size=4, interventions=[huge]).tensor
    assert want_huge.min() == pytest.approx(5e36, rel=1e-6)
    model.hf.cuda()
    landed, zeroed, rows_landed = [], [], []
    land = mahals.activations._Staging._land

    def spy(staging, segment, done, zero_first=()):
        landed.append(len(segment))
        zeroed.append(sorted(zero_first))
        rows_landed.append(sorted(row for _, rows, _ in segment for row in rows))
        land(staging, segment, done, zero_first)

    monkeypatch.setattr(mahals.activations._Staging, "_land", spy)
    got = capture(model, texts, pool="mean", batch_size=4).tensor
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert landed == steps  # batches a step: 23 texts in batches of 4
    # the step before the last batch zeroes exactly the rows that batch lands into, no other
    assert zeroed[-2] == rows_landed[-1] and len(rows_landed[-1]) == 3
    assert all(not rows for i, rows in enumerate(zeroed) if i != len(zeroed) - 2)
    got_huge = capture(model, texts, layers=[1], batch_size=4, interventions=[huge]).tensor
    torch.testing.assert_close(got_huge, want_huge, rtol=1e-4, atol=0)
    one_batch = capture(model, texts, pool="mean", batch_size=len(texts)).tensor
    torch.testing.assert_close(one_batch, want, rtol=1e-4, atol=1e-5)
    marked = [5, 17]
    token = model.tokenizer("zebra", add_special_tokens=False)["input_ids"][-1]
    for row in marked:
        texts[row] += " zebra"
    n_layers = model.n_layers
    nan = _NanInRowsWith(1, token)
    expected = re.escape(f"layers {list(range(1, n_layers))}")
    with pytest.raises(FloatingPointError, match=expected) as error:
        capture(model, texts, pool="mean", batch_size=len(texts), interventions=[nan])
    assert f"rows {marked}" in str(error.value)
    with pytest.raises(FloatingPointError, match=r"rows \[(5|17)\]"):
        capture(model, texts, pool="mean", batch_size=1, interventions=[nan])
