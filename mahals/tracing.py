"""The one place that reads and writes the residual stream: nnsight traces over a padded batch.

Every forward pass mahals makes goes through :func:`run_trace` (one trace over one batch) or
:func:`generate` (one nnsight generate trace: the prompt pass and every decoding step).
A trace that would hand nnsight's worker nothing (every read held, see below; nothing written
in a body; no logits) runs the forward without nnsight's interleaver, through the same
modules and controllers.

* **Layer *l*** is the output of decoder layer *l* (the residual stream after block *l*).
* A trace visits the layers it needs in forward order; at each one it first applies the
  :class:`Intervention` objects that write there (in the order given), then reads — so a read
  at a steered layer sees the write. Nothing outside :mod:`mahals.arch` knows how a layer's
  output is packed (a plain tensor, or Falcon's ``(hidden, ...)`` tuple).
* Reads are reduced on the device by a reader (e.g. pooling ``[batch, tokens, d]`` →
  ``[batch, d]``) so no ``[batch, tokens, layers, d]`` tensor is built or moved to the host.
* Each ``.output`` the trace body touches costs a switch into nnsight's worker (≈ 70 µs on a
  fast host), which small batches feel. So when a batch is small (the held layers' outputs fit
  in :data:`HOLD_BYTES`), the layers that are only read are *held*: a call wrapped around
  each one's forward keeps a reference to its output on the device (no copy; it runs inside
  nnsight's controller, so it sees what a body read of the layer would), and after the
  forward the reader reduces them all at once (``reader.read_many``, e.g. one masked ``bmm``
  over the stacked layers instead of one per layer). The body then touches only the layers it
  writes; a capture without interventions would have an empty trace body, so it runs
  untraced (a trace around it cost ≈ 0.4 ms a batch of an 8B model at 4 × 128 on an H200).
* Only the modules the trace body touches hand their values to nnsight (the model itself and
  the layers it writes or reads): every other routed module runs as it does outside a trace
  for that trace (:func:`_handing_off_only`), which spares three interleaver handoffs per
  module and forward pass (106 → 5 in a bare trace of a 32-layer model).
* The forward stops after the last layer it needs, unless logits are asked for: through
  ``tracer.stop()`` in the body, or, when that layer is held, by raising nnsight's own
  ``EarlyStopException`` in its held call (nnsight's interleaver, or :func:`run_trace`
  around an untraced forward, ends the run on it) — unless accelerate's device hook is on
  that layer, whose work after the forward must run.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Int
from nnsight.intervention.interleaver import EarlyStopException
from torch import Tensor

if TYPE_CHECKING:
    from mahals.models import MahalsModel

__all__ = [
    "Batch",
    "Generation",
    "Intervention",
    "LayerReader",
    "LayerReads",
    "LogitsReader",
    "generate",
    "interventions_fingerprint",
    "run_trace",
]

PaddingSide = Literal["right", "left"]

HOLD_BYTES = 1 << 30
"""Most bytes of whole-layer outputs a trace holds on the device to spare per-layer switches
(a reader's ``read_many`` may stack them: as much again while it runs)."""


@dataclass(frozen=True)
class Batch:
    """A padded batch of token sequences, as one forward pass sees it.

    Attributes:
        input_ids: ``[batch, tokens]`` token ids (padding where ``attention_mask`` is 0).
        attention_mask: ``[batch, tokens]``, 1 on real tokens.
        position_ids: ``[batch, tokens]``, 0 at each row's first real token.
        first: ``[batch]`` index of each row's first real token.
        last: ``[batch]`` index of each row's last real token.
        step: 0 for a prompt pass; *k* ≥ 1 for the *k*-th decoding step of a generation, whose
            hidden states hold one new token per row (``tokens`` = 1, every position real).
        padded: whether any row has padding (known on the host: no device synchronisation).
    """

    input_ids: Int[Tensor, "batch tokens"]
    attention_mask: Int[Tensor, "batch tokens"]
    position_ids: Int[Tensor, "batch tokens"]
    first: Int[Tensor, " batch"]
    last: Int[Tensor, " batch"]
    step: int = 0
    padded: bool = True
    _decoding: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)
    _copies: dict[torch.device, Batch] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def pad(
        cls,
        sequences: Sequence[Sequence[int]],
        *,
        pad_id: int,
        side: PaddingSide = "right",
        device: torch.device | str = "cpu",
    ) -> Batch:
        """Pad token-id lists to one ``[batch, tokens]`` block on ``device``."""
        if side not in ("right", "left"):
            raise ValueError(f"padding side {side!r} must be 'right' or 'left'")
        if not sequences or any(len(seq) == 0 for seq in sequences):
            raise ValueError("Batch.pad needs at least one sequence, each with ≥ 1 token")
        device = torch.device(device)
        sizes = [len(seq) for seq in sequences]
        length = max(sizes)
        padded = min(sizes) != length
        # Built with numpy from padded lists: a small batch's trace feels every host-side
        # operation, and a numpy one costs a small fraction of a torch one on the CPU.
        if not padded:
            rows = sequences
        elif side == "left":
            rows = [[pad_id] * (length - len(seq)) + list(seq) for seq in sequences]
        else:
            rows = [list(seq) + [pad_id] * (length - len(seq)) for seq in sequences]
        ids = np.array(rows, dtype=np.int64)
        lengths = np.array(sizes, dtype=np.int64)
        first = length - lengths if side == "left" else np.zeros_like(lengths)
        last = first + lengths - 1
        column = np.arange(length)
        mask = ((column >= first[:, None]) & (column <= last[:, None])).astype(np.int64)
        position_ids = np.minimum(np.maximum(column - first[:, None], 0), (lengths - 1)[:, None])
        if device.type != "cuda":
            parts = [torch.from_numpy(part) for part in (ids, mask, position_ids, first, last)]
            return cls(*parts, padded=padded)
        # One pinned buffer, one non-blocking copy: a pageable copy would wait for the GPU to
        # finish the previous batch, and five small copies cost five launches.
        n_rows, cells = len(sequences), ids.size
        staged = torch.empty(3 * cells + 2 * n_rows, dtype=torch.long, pin_memory=True)
        np.concatenate(
            [ids.ravel(), mask.ravel(), position_ids.ravel(), first, last], out=staged.numpy()
        )
        parts = staged.to(device, non_blocking=True).split([cells] * 3 + [n_rows] * 2)
        ids, mask, position_ids = (part.view(n_rows, length) for part in parts[:3])
        return cls(ids, mask, position_ids, parts[3], parts[4], padded=padded)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def is_prompt(self) -> bool:
        return self.step == 0

    def decoding_step(self, step: int) -> Batch:
        """The batch as decoding step ``step`` ≥ 1 sees it: one real (generated) token per row
        (``input_ids`` are placeholders). The tensors that do not change with the step are
        made once per prompt batch, so a step costs one small kernel."""
        if not self._decoding:
            size, device = self.size, self.device
            self._decoding.extend([
                torch.ones((size, 1), dtype=torch.long, device=device),  # placeholder ids
                torch.ones((size, 1), dtype=torch.long, device=device),  # mask
                torch.zeros(size, dtype=torch.long, device=device),  # first = last = 0
                (self.last - self.first).unsqueeze(1),  # position of the last prompt token
            ])  # fmt: skip
        ids, mask, zeros, offset = self._decoding
        return Batch(ids, mask, offset + step, zeros, zeros, step, padded=False)

    def on(self, device: torch.device) -> Batch:
        """This batch on ``device`` (itself when already there; a copy is made once per device).

        A model split across GPUs (``device_map``) holds each layer's hidden states on that
        layer's GPU: readers and writers get the batch there, so masks, positions and row
        indices meet the hidden states on their own device.
        """
        if device == self.input_ids.device:
            return self
        if device not in self._copies:
            self._copies[device] = replace(
                self,
                input_ids=self.input_ids.to(device),
                attention_mask=self.attention_mask.to(device),
                position_ids=self.position_ids.to(device),
                first=self.first.to(device),
                last=self.last.to(device),
            )
        return self._copies[device]

    def token_mask(self) -> Float[Tensor, "batch tokens"]:
        """``attention_mask`` as float32, for masked reductions on the device."""
        return self.attention_mask.to(torch.float32)


@runtime_checkable
class Intervention(Protocol):
    """Something that writes to the residual stream during a trace.

    ``layers`` are the decoder layers it writes. It is called once per written layer and
    forward pass (prompt pass and each decoding step) with the layer index, that layer's
    output hidden states ``[batch, tokens, d_model]`` (model dtype and device) and the
    :class:`Batch`; it edits ``hidden`` in place and returns ``None``, or returns the new
    hidden states (same shape), which are written back. ``fingerprint()`` is a stable string
    that identifies what it does (caches fold it into their identity).
    """

    layers: tuple[int, ...]

    def __call__(self, layer: int, hidden: Tensor, batch: Batch) -> Tensor | None: ...

    def fingerprint(self) -> str: ...


LayerReader = Callable[[int, Tensor, Batch], Tensor]
"""``(layer, hidden [batch, tokens, d], batch) -> tensor``: what to keep of a layer's output.

A reader may also have ``read_many(layers, hiddens, batch) -> list[tensor]``, which reduces
several layers' outputs (all on one device) at once and returns what the per-layer call would,
one tensor per layer (a :class:`LayerReads` when it made them as one stacked tensor);
:func:`run_trace` uses it for held layers."""


class LayerReads(list):
    """What a trace read: one tensor per read layer, in order (a ``list``).

    ``stacked`` is the same reads stacked on dim 1 (``[batch, layers, ...]``) when one
    reduction made them all (each read is a view of it), else ``None``: a caller that wants
    them stacked takes it rather than stacking them again.
    """

    stacked: Tensor | None = None

    @classmethod
    def of(cls, stacked: Tensor) -> LayerReads:
        """The reads ``stacked[:, i]`` of a tensor stacked on dim 1."""
        reads = cls(stacked.unbind(1))
        reads.stacked = stacked
        return reads


LogitsReader = Callable[[Tensor, Batch], Tensor]
"""``(logits [batch, tokens, vocab], batch) -> tensor``: what to keep of the model's logits."""


def interventions_fingerprint(interventions: Sequence[Intervention]) -> str:
    """One SHA-256 over the interventions' fingerprints, in order (``""`` when there are none)."""
    if not interventions:
        return ""
    digest = hashlib.sha256()
    for intervention in interventions:
        digest.update(intervention.fingerprint().encode("utf-8") + b"\0")
    return digest.hexdigest()


def _check_layers(model: MahalsModel, layers: Sequence[int], what: str) -> None:
    n_layers = model.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise IndexError(
            f"{what} layers {bad} out of range for {model.name!r}, which has "
            f"{n_layers} layers (0..{n_layers - 1})"
        )


def _writers_by_layer(
    model: MahalsModel, interventions: Sequence[Intervention]
) -> dict[int, list[Intervention]]:
    writers: dict[int, list[Intervention]] = {}
    for intervention in interventions:
        _check_layers(model, intervention.layers, type(intervention).__name__)
        for layer in intervention.layers:
            writers.setdefault(layer, []).append(intervention)
    return writers


def _apply(
    model: MahalsModel, writers: Sequence[Intervention], layer: int, layer_output, batch: Batch
) -> Tensor:
    """Run the writers of ``layer`` in order; returns the (written) residual-stream tensor."""
    hidden = model.adapter.unwrap(layer_output)
    batch = batch.on(hidden.device)
    for intervention in writers:
        new = intervention(layer, hidden, batch)
        if new is not None and new is not hidden:
            model.adapter.write(layer_output, new)
    return hidden


def run_trace(
    model: MahalsModel,
    batch: Batch,
    *,
    read_layers: Sequence[int] = (),
    reader: LayerReader | None = None,
    interventions: Sequence[Intervention] | None = None,
    logits_reader: LogitsReader | None = None,
) -> tuple[LayerReads, Tensor | None]:
    """One nnsight trace of ``model`` over ``batch``: write, then read, layer by layer (or,
    when every read is held and nothing is written or read in a body, the same forward
    without nnsight's interleaver; see the module notes).

    Args:
        model: from :func:`mahals.load_model`.
        batch: the padded inputs (:meth:`Batch.pad`), on the model's device.
        read_layers: decoder layers to read, ascending, no duplicates.
        reader: reduces each read layer's hidden states on the device (default: keep them
            whole, cloned — meant for a few texts).
        interventions: writers applied at their layers before any read there; ``None`` uses
            the model's active steering (:func:`mahals.steering.apply.steering`), ``()`` none.
        logits_reader: when given, the forward runs to the LM head and this reduces the logits
            ``[batch, tokens, vocab]`` on the device.

    Returns:
        ``(reads, logits)``: one tensor per read layer (what ``reader`` returned; a
        :class:`LayerReads`, a list), and what ``logits_reader`` returned (``None`` without
        one). Tensors stay on the device.
    """
    read_layers = list(read_layers)
    if read_layers != sorted(set(read_layers)):
        raise ValueError(f"read_layers must be ascending without duplicates, got {read_layers}")
    _check_layers(model, read_layers, "read")
    if interventions is None:
        interventions = model.active_interventions
    writers = _writers_by_layer(model, interventions)
    held = _held_layers(model, batch, read_layers, writers, reader)
    visit = sorted((set(read_layers) - set(held)) | set(writers))
    # The forward stops after the last layer it needs, unless logits are read: in the body when
    # it visits that layer, else in the layer's held call (sparing the body a switch there).
    stop_held = logits_reader is None and bool(held) and (not visit or held[-1] > visit[-1])
    if stop_held and "_hf_hook" in model.decoder_blocks()[held[-1]].__dict__:
        # accelerate's device hook (a model placed by a device map) has work after the layer's
        # forward (offloaded weights go back) that a stop inside it would skip: stop in the body
        visit.append(held.pop())
        stop_held = False
    # Reads are returned through these (the trace body runs in nnsight's worker: a plain
    # assignment inside the block would not reach this frame).
    reads: dict[int, Tensor] = {}
    logits: list[Tensor] = []
    held_outputs: list[Tensor] = []
    # Without padding the mask and positions are the defaults; leaving them out lets attention
    # take its causal fast path instead of building and applying an explicit mask.
    call = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.padded:
        call |= {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    if not visit and logits_reader is None:
        # Every read is held and nothing is written in a body or read from the logits: a trace
        # would hand nnsight's worker nothing, and its interleaver's setup and teardown would be
        # its only work beyond the forward. The forward runs the same modules without it
        # (through nnsight's controllers, each running its body as outside a trace, where the
        # held calls are) and ends where the trace would, at the last held call's stop.
        with (
            torch.inference_mode(),
            _holding(model, held, held_outputs, stop_after_last=stop_held),
            suppress(EarlyStopException),
        ):
            model.hf(**call)
    else:
        with (
            torch.inference_mode(),
            warnings.catch_warnings(),
            _holding(model, held, held_outputs, stop_after_last=stop_held),
            _handing_off_only(model, visit),
        ):
            warnings.simplefilter("ignore", UserWarning)
            envoys = model.layers
            # a with statement of its own: nnsight runs the body of the block that opens it
            with model.nn.trace(**call) as tracer:
                for layer in visit:
                    layer_output = envoys[layer].output
                    hidden = _apply(model, writers.get(layer, ()), layer, layer_output, batch)
                    if layer in read_layers:
                        if reader is not None:
                            reads[layer] = reader(layer, hidden, batch.on(hidden.device))
                        else:
                            # A later block may add to this in place (Falcon): keep a copy.
                            reads[layer] = hidden.clone()
                if logits_reader is not None:
                    output_logits = model.nn.output.logits
                    logits.append(logits_reader(output_logits, batch.on(output_logits.device)))
                elif not stop_held:
                    tracer.stop()
    if held:
        if len(held_outputs) != len(held):
            raise RuntimeError(
                f"held layers {held} produced {len(held_outputs)} outputs in one forward pass"
            )
        with torch.inference_mode():
            held_reads = _read_held(reader, held, held_outputs, batch)
        if len(held) == len(read_layers) and isinstance(held_reads, LayerReads):
            return held_reads, (logits[0] if logits else None)
        reads.update(zip(held, held_reads, strict=True))
    return LayerReads(reads[layer] for layer in read_layers), (logits[0] if logits else None)


@contextmanager
def _after_layers(model: MahalsModel, calls: dict[int, Callable]) -> Iterator[None]:
    """While the block runs, ``calls[layer](output)`` runs on every output of decoder layer
    ``layer`` before the layer returns it.

    The call wraps the forward that nnsight's controller runs for the layer (its state's
    ``body``) rather than being a torch forward hook: a hooked module takes torch's slow call
    path, and registering and removing a hook per layer and trace costs a small batch more than
    the call itself. Only for layers the trace body does not touch (muted by
    :func:`_handing_off_only`), so the value is the one a body read of the layer would see.
    """
    states = model.layer_states()
    bodies = {layer: states[layer].body for layer in calls}
    for layer, body in bodies.items():
        states[layer].body = _then(body, calls[layer])
    try:
        yield
    finally:
        for layer, body in bodies.items():
            states[layer].body = body


def _then(body: Callable, call: Callable) -> Callable:
    def forward(module, *args, **kwargs):
        output = body(module, *args, **kwargs)
        call(output)
        return output

    return forward


@contextmanager
def _handing_off_only(model: MahalsModel, layers: Sequence[int]) -> Iterator[None]:
    """While the block runs, only the model itself and the decoder blocks ``layers`` hand
    their inputs and outputs to nnsight's interleaver; every other routed module runs as it
    does outside a trace (nnsight's controller finds no route and calls the module's own
    forward, accelerate's device hooks included). For the trace bodies of this module, which
    touch nothing else."""
    states = model.layer_states()
    kept = {id(states[layer]) for layer in layers}
    root = model.hf
    muted = [
        (state, state.routes)
        for module, state in model.routed_modules()
        if module is not root and id(state) not in kept
    ]
    for state, _ in muted:
        state.routes = []
    try:
        yield
    finally:
        for state, routes in muted:
            state.routes = routes


def _holding(
    model: MahalsModel, layers: Sequence[int], outputs: list[Tensor], *, stop_after_last: bool
):
    """Append the residual-stream output of each of ``layers`` to ``outputs`` (in forward
    order) while the block runs; with ``stop_after_last``, the forward stops once the last
    of them is held (nnsight's own early stop, which its interleaver ends the run on)."""
    unwrap = model.adapter.unwrap

    def hold(output) -> None:
        outputs.append(unwrap(output))

    def hold_and_stop(output) -> None:
        hold(output)
        raise EarlyStopException

    calls = dict.fromkeys(layers, hold)
    if stop_after_last:
        calls[layers[-1]] = hold_and_stop
    return _after_layers(model, calls)


def _writing(model: MahalsModel, writers: dict[int, list[Intervention]], prompt: Batch):
    """Apply ``writers`` on every forward pass of a generation while the block runs.

    A generate trace reads nothing inside the model, so its edits run inside the steered
    layers' forwards (:func:`_after_layers`) rather than as trace-body writes: a body write
    costs each steered layer two switches into and out of nnsight's worker on every decoding
    step, this one Python call. The call sees the layer's output as a body write would and
    writes the same way (in place, see :func:`_apply`), so the tokens are the same. The *k*-th
    call at a layer is the prompt pass (*k* = 0) or decoding step *k*.
    """
    visits = dict.fromkeys(writers, 0)
    latest: list = [0, prompt]  # [step, batch]: one Batch per step, shared by its layers

    def writer(layer: int) -> Callable:
        def write(output) -> None:
            step = visits[layer]
            visits[layer] = step + 1
            if latest[0] != step:
                latest[:] = step, prompt.decoding_step(step)
            _apply(model, writers[layer], layer, output, latest[1])

        return write

    return _after_layers(model, {layer: writer(layer) for layer in writers})


def _read_held(
    reader: LayerReader, layers: Sequence[int], hiddens: list[Tensor], batch: Batch
) -> list[Tensor]:
    read_many = getattr(reader, "read_many", None)
    devices = {hidden.device for hidden in hiddens}
    if read_many is not None and len(devices) == 1:
        return read_many(layers, hiddens, batch.on(devices.pop()))
    return [
        reader(layer, hidden, batch.on(hidden.device))
        for layer, hidden in zip(layers, hiddens, strict=True)
    ]


def _held_layers(
    model: MahalsModel,
    batch: Batch,
    read_layers: Sequence[int],
    writers: dict[int, list[Intervention]],
    reader: LayerReader | None,
) -> list[int]:
    """The read-only layers a small batch records whole (see the module notes), or none."""
    if reader is None or model.adapter.adds_in_place:
        return []
    layers = [layer for layer in read_layers if layer not in writers]
    held_bytes = batch.input_ids.numel() * model.d_model * model.dtype.itemsize * len(layers)
    return layers if held_bytes <= HOLD_BYTES else []


@dataclass(frozen=True)
class Generation:
    """Greedy (or sampled) continuations of a batch of prompts.

    Attributes:
        texts: decoded continuations, special tokens removed, in prompt order.
        token_ids: generated token ids per prompt (up to and including the first EOS).
        prompt_ids: the prompts' token ids (unpadded).
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def _strip_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def _eos_ids(model: MahalsModel) -> set[int]:
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])


def generate(
    model: MahalsModel,
    sequences: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    interventions: Sequence[Intervention] | None = None,
    do_sample: bool = False,
    **generate_kwargs,
) -> Generation:
    """Generate from token-id prompts in one left-padded batch through an nnsight generate trace.

    Interventions reach the prompt pass (``batch.step == 0``) and every decoding step
    (``batch.step`` = 1, 2, …; hidden states ``[batch, 1, d_model]``). Without interventions
    and with ``do_sample=False`` the tokens equal ``hf.generate``'s greedy output on the same
    left-padded batch.

    Args:
        model: from :func:`mahals.load_model`.
        sequences: prompt token ids (e.g. from :func:`mahals.activations.tokenize`).
        max_new_tokens: generation length cap (≥ 1).
        interventions: as in :func:`run_trace` (``None``: the model's active steering).
        do_sample: sample instead of greedy decoding; other keyword arguments go to
            ``transformers``' ``generate``.
    """
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    if interventions is None:
        interventions = model.active_interventions
    writers = _writers_by_layer(model, interventions)
    tokenizer = model.tokenizer
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    prompt = Batch.pad(sequences, pad_id=pad_id or 0, side="left", device=model.device)
    with (
        torch.inference_mode(),
        warnings.catch_warnings(),
        _writing(model, writers, prompt),
        _handing_off_only(model, ()),
        model.nn.generate(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad_id,
            **generate_kwargs,
        ) as tracer,
    ):
        warnings.simplefilter("ignore", UserWarning)  # nnsight's, not the caller's concern
        with tracer.invoke(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask):
            output = tracer.result.save()
    new_tokens = output[:, prompt.input_ids.shape[1] :].tolist()
    eos = _eos_ids(model)
    token_ids = [_strip_after_eos(row, eos) for row in new_tokens]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return Generation(texts, token_ids, [list(seq) for seq in sequences])
