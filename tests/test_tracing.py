"""The read/write tracing core on every adapter architecture, against plain HF forwards with
torch hooks as the independent reference, and nnsight generation against ``hf.generate``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import torch
import transformers

from mahals.activations import capture, pooling_reader
from mahals.models import load_model
from mahals.registry import RegistryError, load_registry
from mahals.tracing import Batch, generate, interventions_fingerprint, run_trace

from conftest import WritesNothing, build_tiny, tiny_config

PROMPTS = ["Hello there", "Why is the sky blue?", "A"]


@dataclass
class AddDelta:
    """Adds ``delta`` ``[d]`` at ``layer`` on every position (returns a new tensor)."""

    layer: int
    delta: torch.Tensor

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def __call__(self, layer, hidden, batch):
        return hidden + self.delta.to(hidden.dtype)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.delta.numpy().tobytes()).hexdigest()


def _ids(model, texts):
    return [model.tokenizer(t)["input_ids"] for t in texts]


def _added(layer_output, delta):
    """A layer's output with ``delta`` added to its residual stream (reference, plain torch)."""
    if isinstance(layer_output, tuple):
        return (layer_output[0] + delta,) + tuple(layer_output[1:])
    return layer_output + delta


def _hooked_states(model, text: str, layer: int | None = None, delta=None) -> torch.Tensor:
    """``[L, tokens, d]`` float64 outputs of every decoder layer of one unpadded text, from a
    plain HF forward, adding ``delta`` to ``layer``'s output with a torch forward hook."""
    blocks = model.adapter.decoder_layers(model.hf)
    seen = []
    handles = []
    for index, block in enumerate(blocks):

        def hook(_m, _i, out, index=index):
            if index == layer:
                out = _added(out, delta)
            seen.append(model.adapter.unwrap(out)[0].double().clone())
            return out

        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.hf(**model.tokenizer(text, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(seen)


def test_write_then_read_at_one_layer_and_downstream(tiny_model):
    torch.manual_seed(1)
    layer = 1
    delta = torch.randn(tiny_model.d_model) * 3
    text = PROMPTS[1]
    batch = Batch.pad(_ids(tiny_model, [text]), pad_id=1, device="cpu")
    reads, _ = run_trace(
        tiny_model, batch, read_layers=[0, 1, 2], interventions=[AddDelta(layer, delta)]
    )
    plain = _hooked_states(tiny_model, text)
    steered = _hooked_states(tiny_model, text, layer, delta)
    # Layer before: unchanged; the written layer: exactly h + δ; downstream: what HF computes
    # from the edited residual stream.
    torch.testing.assert_close(reads[0][0].double(), plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        reads[1][0].double(), plain[1] + delta.double(), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(reads[2][0].double(), steered[2], rtol=1e-5, atol=1e-4)
    assert (steered[2] - plain[2]).abs().max() > 1e-2  # the write really changed the output


def test_read_after_write_sees_the_write_and_in_place_edits_work(tiny_model):
    batch = Batch.pad(_ids(tiny_model, PROMPTS), pad_id=1, device="cpu")

    class Zero:
        layers = (2,)

        def __call__(self, layer, hidden, batch):
            hidden.zero_()  # in place, returns None

        def fingerprint(self):
            return "zero"

    reads, _ = run_trace(tiny_model, batch, read_layers=[2], interventions=[Zero()])
    assert torch.count_nonzero(reads[0]) == 0


def test_interventions_stack_in_order_and_fingerprints_differ(tiny_model):
    d = tiny_model.d_model
    a, b = AddDelta(0, torch.ones(d)), AddDelta(0, 2 * torch.ones(d))
    batch = Batch.pad(_ids(tiny_model, PROMPTS[:1]), pad_id=1, device="cpu")
    plain, _ = run_trace(tiny_model, batch, read_layers=[0], interventions=())
    both, _ = run_trace(tiny_model, batch, read_layers=[0], interventions=[a, b])
    torch.testing.assert_close(both[0], plain[0] + 3, rtol=1e-6, atol=1e-5)
    assert interventions_fingerprint([a, b]) != interventions_fingerprint([b, a])
    assert interventions_fingerprint([]) == ""


def test_capture_reads_what_an_intervention_wrote(tiny_model):
    delta = torch.full((tiny_model.d_model,), 0.5)
    plain = capture(tiny_model, PROMPTS, layers=[1], pool="mean")
    steered = capture(
        tiny_model, PROMPTS, layers=[1], pool="mean", interventions=[AddDelta(1, delta)]
    )
    torch.testing.assert_close(steered.tensor, plain.tensor + 0.5, rtol=1e-5, atol=1e-5)


def test_held_and_switched_reads_agree(tiny_model, monkeypatch):
    # Small batches hold read-only layers whole (a call inside each layer's forward); larger
    # ones read each layer through its own switch into the trace body. Both paths, around a written layer, give one answer.
    from mahals import tracing
    from mahals.activations import pooling_reader

    torch.manual_seed(3)
    write = AddDelta(1, torch.randn(tiny_model.d_model))
    batch = Batch.pad(_ids(tiny_model, PROMPTS), pad_id=1, device="cpu")
    every = list(range(tiny_model.n_layers))
    held = tracing._held_layers(tiny_model, batch, every, {1: [write]}, pooling_reader("mean"))
    assert held == ([] if tiny_model.adapter.adds_in_place else [i for i in every if i != 1])
    default = capture(tiny_model, PROMPTS, pool="mean", interventions=[write])
    monkeypatch.setattr(tracing, "HOLD_BYTES", 0)
    switched = capture(tiny_model, PROMPTS, pool="mean", interventions=[write])
    assert torch.equal(default.tensor, switched.tensor)


@pytest.mark.parametrize(
    ("read_layers", "written", "hold"),
    [
        ([0], None, True),  # held only: the trace body is empty, layer 0's held call stops
        ([0, 1], 0, True),  # the body writes 0, then 1's held call stops
        ([0], 1, True),  # the body writes 1 after 0 was held, and stops there
        ([0, 1], None, False),  # every read through the body, which stops after 1
    ],
)
def test_the_forward_stops_after_the_last_layer_it_needs(
    tiny_model, monkeypatch, read_layers, written, hold
):
    from mahals import tracing

    if not hold:
        monkeypatch.setattr(tracing, "HOLD_BYTES", 0)
    torch.manual_seed(5)
    delta = torch.randn(tiny_model.d_model)
    writes = [] if written is None else [AddDelta(written, delta)]
    ran = []
    blocks = tiny_model.adapter.decoder_layers(tiny_model.hf)
    modules = [*blocks, tiny_model.hf.get_output_embeddings()]
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, index=index: ran.append(index))
        for index, module in enumerate(modules)
    ]
    batch = Batch.pad(_ids(tiny_model, PROMPTS[1:2]), pad_id=1, device="cpu")
    try:
        reads, _ = run_trace(
            tiny_model, batch, read_layers=read_layers, reader=lambda _l, h, _b: h.clone(),
            interventions=writes,
        )  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    last = max(read_layers + ([] if written is None else [written]))
    assert ran == list(range(last + 1))  # no later block, no LM head
    expected = _hooked_states(tiny_model, PROMPTS[1], written, delta)
    for layer, read in zip(read_layers, reads, strict=True):
        torch.testing.assert_close(read[0].double(), expected[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("pool", "sinks"),
    [("mean", "none"), ("mean", "first"), ("mean", "norm"), ("last", "none"), ("first", "none")],
)
def test_held_layers_pooled_at_once_equal_one_layer_at_a_time(tiny_model, pool, sinks):
    # Held layers are pooled with one stacked reduction (read_many); the same reader called
    # once per layer on the same hidden states is the reference. Padded rows included.
    from mahals.activations import pooling_reader

    batch = Batch.pad(_ids(tiny_model, PROMPTS), pad_id=1, device="cpu")
    every = list(range(tiny_model.n_layers))
    hiddens, _ = run_trace(tiny_model, batch, read_layers=every, interventions=())
    reader = pooling_reader(pool, sinks)
    at_once = reader.read_many(every, hiddens, batch)
    one_by_one = [
        pooling_reader(pool, sinks)(layer, h, batch)
        for layer, h in zip(every, hiddens, strict=True)
    ]
    for got, want in zip(at_once, one_by_one, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_held_layers_leave_no_wrappers_and_the_model_gets_our_batch_as_it_is(tiny_model):
    # The wrappers around the layers' forwards that hold outputs live for one trace only, and
    # no torch hook is left behind; an unpadded batch reaches the model without a mask
    # (attention's causal fast path), a padded one with ours.
    blocks = tiny_model.adapter.decoder_layers(tiny_model.hf)
    hooks_before = [dict(block._forward_hooks) for block in blocks]  # transformers adds its own
    bodies_before = [state.body for state in tiny_model.layer_states()]
    assert bodies_before == [type(block).forward for block in blocks]
    seen = []

    def spy(_module, _args, kwargs):
        seen.append((kwargs.get("attention_mask"), kwargs.get("position_ids")))

    handle = tiny_model.hf.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        for texts in (PROMPTS[1:2], PROMPTS):
            batch = Batch.pad(_ids(tiny_model, texts), pad_id=1, device="cpu")
            capture(tiny_model, texts, pool="mean")
            run_trace(
                tiny_model, batch, read_layers=[0], reader=lambda _l, h, _b: h, interventions=()
            )
    finally:
        handle.remove()
    assert [dict(block._forward_hooks) for block in blocks] == hooks_before
    assert [state.body for state in tiny_model.layer_states()] == bodies_before
    (mask_1, positions_1), _, _, (mask_n, positions_n) = seen
    assert mask_1 is None and positions_1 is None
    assert torch.equal(mask_n, batch.attention_mask) and torch.equal(
        positions_n, batch.position_ids
    )


def test_logits_reader_runs_to_the_lm_head(tiny_model):
    text = PROMPTS[1]
    batch = Batch.pad(_ids(tiny_model, [text]), pad_id=1, device="cpu")
    _, logits = run_trace(tiny_model, batch, logits_reader=lambda logits, _b: logits.clone())
    with torch.no_grad():
        expected = tiny_model.hf(**tiny_model.tokenizer(text, return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_layers_are_named(tiny_model):
    batch = Batch.pad(_ids(tiny_model, PROMPTS[:1]), pad_id=1, device="cpu")
    with pytest.raises(IndexError, match=r"AddDelta layers \[7\] out of range"):
        run_trace(tiny_model, batch, interventions=[AddDelta(7, torch.zeros(tiny_model.d_model))])
    with pytest.raises(ValueError, match="ascending"):
        run_trace(tiny_model, batch, read_layers=[2, 1])


def test_batch_pad_positions_match_the_mask():
    batch = Batch.pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.first.tolist() == [0, 2] and batch.last.tolist() == [2, 2]
    step = batch.decoding_step(2)
    assert step.position_ids.tolist() == [[4], [2]] and step.step == 2
    later = batch.decoding_step(3)  # shares the step-independent tensors, not the positions
    assert later.position_ids.tolist() == [[5], [3]] and step.position_ids.tolist() == [[4], [2]]
    assert later.attention_mask.tolist() == [[1], [1]] and later.last.tolist() == [0, 0]


def _hf_greedy(model, texts, max_new_tokens):
    tok = model.tokenizer
    ids = _ids(model, texts)
    batch = Batch.pad(ids, pad_id=tok.pad_token_id, side="left")
    with torch.no_grad():
        out = model.hf.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return ids, out[:, batch.input_ids.shape[1] :]


def test_generation_through_nnsight_equals_hf_generate(tiny_model):
    ids, expected = _hf_greedy(tiny_model, PROMPTS, 6)
    result = generate(tiny_model, ids, max_new_tokens=6)
    for row, tokens in enumerate(result.token_ids):
        assert tokens == expected[row, : len(tokens)].tolist()
    assert result.prompt_ids == ids


def test_generation_applies_interventions_at_every_step(tiny_model):
    """Steered generation equals HF generation with the same edit as a torch hook (which runs
    on the prompt pass and every decoding step), and differs from unsteered generation."""
    torch.manual_seed(0)
    delta = torch.randn(tiny_model.d_model) * 4
    ids = _ids(tiny_model, PROMPTS)
    steered = generate(tiny_model, ids, max_new_tokens=6, interventions=[AddDelta(1, delta)])
    block = tiny_model.adapter.decoder_layers(tiny_model.hf)[1]
    handle = block.register_forward_hook(lambda _m, _i, out: _added(out, delta))
    try:
        _, expected = _hf_greedy(tiny_model, PROMPTS, 6)
    finally:
        handle.remove()
    for row, tokens in enumerate(steered.token_ids):
        assert tokens == expected[row, : len(tokens)].tolist()
    plain = generate(tiny_model, ids, max_new_tokens=6)
    assert plain.token_ids != steered.token_ids


def test_built_model_takes_dtype_and_device_when_given(tiny_tokenizer):
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    kept = load_model(hf, tokenizer=tiny_tokenizer)
    assert kept.dtype == torch.float32
    cast = load_model(hf, tokenizer=tiny_tokenizer, dtype=torch.bfloat16, device="cpu")
    assert cast.dtype == torch.bfloat16 and hf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="both device= and device_map="):
        load_model(hf, tokenizer=tiny_tokenizer, device="cpu", device_map="auto")


def test_registry_shape_mismatch_names_both(tmp_path, tiny_tokenizer):
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    hf.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(
        '{"models": {"tiny": {"source": "%s", "architecture": "llama", "n_layers": 5, '
        '"d_model": 64}}, "pairs": {}}' % (tmp_path / "ckpt")
    )
    registry = load_registry(registry_file)
    with pytest.raises(
        RegistryError, match=r"says 5 layers x d_model 64.*has 3 layers x d_model 64"
    ):
        load_model("tiny", registry=registry, device="cpu")


def test_sink_free_mean_pooling_equals_a_manual_mean(tiny_tokenizer):
    model = build_tiny("llama", tiny_tokenizer)
    texts = ["Hello there, friend", "Why?", "A"]
    tokens = capture(model, texts, pool="none")
    first = capture(model, texts, pool="mean", sinks="first", padding_side="left")
    norm = capture(model, texts, pool="mean", sinks="norm", sink_norm_ratio=1.05)
    for i, states in enumerate(tokens.per_text):
        states = states.double()  # [L, tokens, d]
        expected = states[:, 1:].mean(1) if states.shape[1] > 1 else states.mean(1)
        torch.testing.assert_close(first.tensor[i].double(), expected, rtol=1e-5, atol=1e-5)
        for layer in range(model.n_layers):
            rest = states[layer, 1:]
            if rest.shape[0] == 0:
                continue
            norms = rest.norm(dim=-1)
            lower_median = norms.sort().values[(rest.shape[0] - 1) // 2]  # torch's median
            keep = rest[norms <= 1.05 * lower_median]
            torch.testing.assert_close(
                norm.tensor[i, layer].double(), keep.mean(0), rtol=1e-5, atol=1e-5
            )
    with pytest.raises(ValueError, match="applies to pool='mean' only"):
        capture(model, texts, pool="last", sinks="first")


def test_full_instrumentation_still_reads_submodules(tiny_tokenizer):
    """``instrument="all"`` keeps nnsight's access to modules inside a block; the default
    routes only what mahals reads and writes (and gives identical captures)."""
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    full = load_model(hf, tokenizer=tiny_tokenizer, instrument="all")
    ids = torch.tensor([_ids(full, ["Hello"])[0]])
    with torch.inference_mode(), full.nn.trace(input_ids=ids):
        attention = full.layers[0].self_attn.output[0].save()
    assert attention.shape[-1] == full.d_model
    before = capture(full, PROMPTS, pool="mean").tensor
    lean = load_model(hf, tokenizer=tiny_tokenizer)  # same weights, residual-only routing
    torch.testing.assert_close(capture(lean, PROMPTS, pool="mean").tensor, before, rtol=0, atol=0)


class Raises:
    """An intervention at ``layer`` that fails mid-forward."""

    layers = (1,)

    def __call__(self, layer, hidden, batch):
        raise RuntimeError("intervention failed")

    def fingerprint(self) -> str:
        return "raises"


def test_a_trace_hands_off_only_the_modules_its_body_touches(tiny_tokenizer, monkeypatch):
    """Modules a trace's body does not touch run as outside a trace (no interleaver handoff);
    their routes are back afterwards, even after a failed trace, so a user's own nnsight
    trace still reaches every module."""
    from nnsight.intervention.interleaver import Interleaver

    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    model = load_model(hf, tokenizer=tiny_tokenizer, instrument="all")
    routes = [list(state.routes) for _, state in model.routed_modules()]
    assert len(routes) > model.n_layers + 2  # "all": every submodule is routed
    handed_off = []
    handle = Interleaver.handle

    def spy(self, provider, value):
        handed_off.append(provider.rsplit(".", 1)[0])
        return handle(self, provider, value)

    monkeypatch.setattr(Interleaver, "handle", spy)
    batch = Batch.pad(_ids(model, PROMPTS), pad_id=1, device="cpu")
    delta = torch.randn(model.d_model)
    reads, _ = run_trace(
        model, batch, read_layers=[0, 1, 2], reader=lambda _l, h, _b: h.clone(),
        interventions=[AddDelta(1, delta)],
    )  # fmt: skip
    # layer 1 is written in the body; 0 and 2 are held, and 2's held call stops the forward
    assert set(handed_off) == {"model", "model.model.layers.1"}
    handed_off.clear()
    model.generate([[5, 6, 7]], max_new_tokens=3, chat=False)
    assert "model" in handed_off and not any(p.startswith("model.model") for p in handed_off)
    with pytest.raises(RuntimeError, match="intervention failed"):
        run_trace(model, batch, read_layers=[0, 2], interventions=[Raises()])  # 0 is held
    monkeypatch.undo()
    assert [list(state.routes) for _, state in model.routed_modules()] == routes
    layer_class = type(model.adapter.decoder_layers(hf)[0])
    assert all(state.body is layer_class.forward for state in model.layer_states())
    ids = torch.tensor([_ids(model, [PROMPTS[1]])[0]])
    with torch.inference_mode(), model.nn.trace(input_ids=ids):
        attention = model.layers[0].self_attn.output[0].save()
        layer_0 = model.layers[0].output.save()
    seen = {}

    def keep(name):
        def hook(_module, _inputs, output) -> None:
            seen[name] = output

        return hook

    blocks = model.adapter.decoder_layers(hf)
    hooks = [
        blocks[0].register_forward_hook(keep("layer")),
        blocks[0].self_attn.register_forward_hook(keep("attn")),
    ]
    with torch.inference_mode():
        hf(input_ids=ids)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(model.adapter.unwrap(layer_0), seen["layer"], rtol=0, atol=0)
    torch.testing.assert_close(attention, seen["attn"][0], rtol=0, atol=0)
    torch.testing.assert_close(reads[0][0, :2], _hooked_states(model, PROMPTS[0])[0, :2].float())


def test_a_capture_without_writes_leaves_sys_settrace_alone(tiny_model, monkeypatch):
    """A trace whose reads are all held and that writes nothing runs untraced: no
    ``sys.settrace`` hook (on Python >= 3.12 each one makes every function the forward runs
    next re-instrument itself). A trace that writes has a body, and nnsight skips it with the
    hook — the spy sees that. Both read what a plain forward does."""
    import sys

    calls = []
    settrace = sys.settrace

    def spy(function):
        calls.append(function)
        settrace(function)

    texts = PROMPTS[:2]
    want = [_hooked_states(tiny_model, text).float().mean(1) for text in texts]
    monkeypatch.setattr(sys, "settrace", spy)
    plain = capture(tiny_model, texts, batch_size=1).tensor
    # Falcon's blocks add to their input in place: its layers are read in the body, not held
    assert len(calls) == (2 * len(texts) if tiny_model.adapter.adds_in_place else 0)
    calls.clear()
    zero = AddDelta(1, torch.zeros(tiny_model.d_model))
    written = capture(tiny_model, texts, batch_size=1, interventions=[zero]).tensor
    assert len(calls) == 2 * len(texts)  # hook on, then off again, per trace
    monkeypatch.undo()
    for row, states in enumerate(want):
        torch.testing.assert_close(plain[row], states, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(written[row], states, rtol=1e-4, atol=1e-5)


def test_a_trace_with_nothing_for_its_body_runs_without_nnsight(tiny_model, monkeypatch):
    """Held reads with nothing written in a body and no logits run the forward without an
    nnsight trace, and read bit for bit what the same reads through a trace do (a writer that
    writes nothing at the last layer puts that layer in a trace body). A forward that fails
    leaves every layer's nnsight body as it was."""
    from nnsight.intervention.envoy import Envoy

    traces = []
    trace = Envoy.trace

    def spy(self, *args, **kwargs):
        traces.append(self)
        return trace(self, *args, **kwargs)

    monkeypatch.setattr(Envoy, "trace", spy)
    last = tiny_model.n_layers - 1
    untraced = capture(tiny_model, PROMPTS, pool="mean", padding_side="left").tensor
    # Falcon's blocks add to their input in place: its layers are read in a trace body
    assert len(traces) == (1 if tiny_model.adapter.adds_in_place else 0)
    traces.clear()
    traced = capture(
        tiny_model, PROMPTS, pool="mean", padding_side="left", interventions=[WritesNothing(last)]
    ).tensor
    assert len(traces) == 1
    torch.testing.assert_close(untraced, traced, rtol=0, atol=0)
    want = [_hooked_states(tiny_model, text).float().mean(1) for text in PROMPTS]
    for row, states in enumerate(want):
        torch.testing.assert_close(untraced[row], states, rtol=1e-4, atol=1e-5)
    layer_class = type(tiny_model.adapter.decoder_layers(tiny_model.hf)[0])

    def fails(*args, **kwargs):
        raise RuntimeError("embedding failed")

    monkeypatch.setattr(torch.nn.functional, "embedding", fails)
    batch = Batch.pad(_ids(tiny_model, PROMPTS), pad_id=1, device=tiny_model.device)
    with pytest.raises(RuntimeError, match="embedding failed"):
        run_trace(
            tiny_model, batch, read_layers=[0, last], reader=pooling_reader("mean"),
            interventions=(),
        )  # fmt: skip
    assert all(state.body is layer_class.forward for state in tiny_model.layer_states())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_mean_pool_on_cuda_equals_a_float64_mean(tiny_tokenizer):
    """The CUDA path multiplies bf16 states with float32 accumulation (no float32 copy)."""
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    model = load_model(hf, tokenizer=tiny_tokenizer, dtype=torch.bfloat16, device="cuda")
    tokens = capture(model, PROMPTS, pool="none")
    for sinks in ("none", "first"):
        pooled = capture(model, PROMPTS, pool="mean", sinks=sinks, padding_side="left")
        for i, states in enumerate(tokens.per_text):
            kept = states[:, 1:] if sinks == "first" and states.shape[1] > 1 else states
            expected = kept.double().mean(1)  # the bf16 values themselves, averaged in float64
            torch.testing.assert_close(pooled.tensor[i].double(), expected, rtol=1e-5, atol=1e-5)
