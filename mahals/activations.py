"""Residual-stream capture: one nnsight trace per batch, pooled on the device, streamed to the host.

Layer *l* means the **output of decoder layer l** — the residual stream after block *l*. For
*l* < L−1 this equals HF's ``hidden_states[l + 1]``; for the last layer HF's
``hidden_states[-1]`` is taken *after* the final norm, whereas mahals returns the block's own
output (before the final norm), so every layer means the same thing.

How the work is arranged, and why:

* texts are tokenised once, sorted by length (longest first) and cut into batches, so padding is
  minimal and an out-of-memory error shows up on the first batch, not the last;
* mahals pads itself (right by default, or left) and passes ``position_ids`` computed from the
  attention mask, so a text gets the same activations whatever its batch, padding side and
  batch size;
* one trace per batch (:func:`mahals.tracing.run_trace`, which also applies any steering) reads
  each requested layer's output, pools it on the device in float32 and stops the forward pass after the last requested layer (the final norm and the LM head are
  never run: their output is not needed); no KV cache is built (``use_cache=False``: HF would
  otherwise keep every layer's keys and values alive, 1–2 GB on a 7–9B model);
* only the pooled ``[batch, layers, d_model]`` block leaves the GPU: one asynchronous copy per
  batch into a pinned host buffer, in the order the batches run, while the next batch runs;
  a helper thread waits for every :data:`LANDING_BYTES` of them (and for those staged before
  the last batch, so that one batch is left to land after the GPU is done) and puts their rows
  in input order. Per-batch host work — waiting for a copy, checking it, moving its rows, or handing
  each batch to a helper thread (≈ 2.4 ms of the main thread per 4 × 128 batch on an H200,
  12 % of the decoder's own time at that size) — holds up the next forward when the host is
  the bottleneck, as at small batches;
* the result is allocated on transparent huge pages where Linux offers them
  (:func:`host_result`): landing into a fresh result of 4 KB pages faults in every 4 KB,
  which at 4 x 128 cost as much as the rest of the capture's host work.
"""

from __future__ import annotations

import math
import mmap
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mahals.layers import select_layers
from mahals.models import MahalsModel
from mahals.tracing import Batch, Intervention, LayerReader, LayerReads, run_trace

__all__ = [
    "Activations",
    "TokenActivations",
    "capture",
    "tokenize",
    "plan_batches",
    "pooling_reader",
    "host_result",
    "POOLS",
    "SINK_RULES",
]

Pool = Literal["mean", "last", "first", "none"]
POOLS: tuple[str, ...] = ("mean", "last", "first", "none")
SinkRule = Literal["none", "first", "norm"]
SINK_RULES: tuple[str, ...] = ("none", "first", "norm")
Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Activations:
    """Pooled residual-stream activations.

    Attributes:
        tensor: float32 CPU ``[n_texts, n_layers, d_model]``, row *i* = input *i*.
        layers: the model-layer index of each entry of dimension 1.
        pool: how tokens were pooled (``mean`` over real tokens, ``last`` or ``first`` real token).
        sinks: which attention-sink tokens a ``mean`` pool left out (see :func:`capture`).
        n_tokens: real (unpadded) token count of each text, ``[n_texts]``.
        model: name of the model they came from.
    """

    tensor: Float[Tensor, "n layer d_model"]
    layers: tuple[int, ...]
    pool: str
    n_tokens: Int[Tensor, " n"]
    model: str
    n_model_layers: int
    sinks: str = "none"

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def at_layer(self, layer: int) -> Float[Tensor, "n d_model"]:
        """Activations of one model layer (negative indices count from the model's last layer)."""
        if layer < 0:
            layer += self.n_model_layers
        if layer not in self.layers:
            raise IndexError(
                f"layer {layer} was not captured; captured layers: {list(self.layers)}"
            )
        return self.tensor[:, self.layers.index(layer)]


@dataclass(frozen=True)
class TokenActivations:
    """Per-token activations (``pool="none"``), for a few texts.

    ``per_text[i]`` is float32 CPU ``[n_layers, n_tokens_i, d_model]`` over the real tokens of
    text *i*; ``token_ids[i]`` are those tokens.
    """

    per_text: list[Float[Tensor, "layer _tokens d_model"]]
    token_ids: list[list[int]]
    layers: tuple[int, ...]
    model: str

    def __len__(self) -> int:
        return len(self.per_text)


def tokenize(
    model: MahalsModel,
    inputs,
    *,
    chat: bool = False,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> list[list[int]]:
    """Token ids of each input, unpadded.

    ``inputs`` is one of: a list of strings; a list of chat conversations (lists of
    ``{"role", "content"}`` dicts, rendered with the tokenizer's chat template); a list of token
    id lists / 1-D tensors; or a mapping with ``input_ids`` (and optionally ``attention_mask``,
    whose zeros are dropped — either padding side). With ``chat=True`` plain strings become
    single user turns. ``max_length`` truncates on the tokenizer's ``truncation_side``.
    """
    if isinstance(inputs, str):
        raise TypeError("capture takes a list of texts, not one string: wrap it as [text]")
    _check_positive("max_length", max_length)
    if isinstance(inputs, Mapping):
        ids = torch.as_tensor(inputs["input_ids"])
        mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids)))
        sequences = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    else:
        inputs = list(inputs)
        if not inputs:
            raise ValueError("capture got no inputs (an empty list)")
        first = inputs[0]
        if isinstance(first, Tensor) or (
            isinstance(first, Sequence)
            and not isinstance(first, str)
            and first
            and isinstance(first[0], int)
        ):
            # lists stay lists: a tensor round trip costs ≈ 20 µs a text
            sequences = [seq.tolist() if isinstance(seq, Tensor) else list(seq) for seq in inputs]
        elif chat or not isinstance(first, str):
            sequences = _chat_tokens(model, inputs, add_generation_prompt)
        else:
            _check_texts(inputs)
            sequences = model.tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
    if not sequences:
        raise ValueError("capture got no inputs (an empty list)")
    empty = [i for i, seq in enumerate(sequences) if len(seq) == 0]
    if empty:
        raise ValueError(f"inputs at rows {empty[:10]} have no tokens")
    vocab = model.config.vocab_size
    bad_ids = [i for i, seq in enumerate(sequences) if min(seq) < 0 or max(seq) >= vocab]
    if bad_ids:
        raise ValueError(
            f"inputs at rows {bad_ids[:10]} hold token ids outside 0..{vocab - 1} "
            f"(the vocabulary of {model.name!r})"
        )
    if max_length is not None:
        keep_end = getattr(model.tokenizer, "truncation_side", "right") == "left"
        sequences = [seq[-max_length:] if keep_end else seq[:max_length] for seq in sequences]
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [i for i, seq in enumerate(sequences) if limit and len(seq) > limit]
    if too_long:
        raise ValueError(
            f"inputs at rows {too_long[:10]} are longer than the {limit} positions of "
            f"{model.name!r}: pass max_length={limit} (or less) to truncate them"
        )
    return [list(seq) for seq in sequences]


def _check_positive(argument: str, value: object) -> None:
    """``value`` must be ``None`` or an int ≥ 1 (``True`` and ``2.0`` are refused)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{argument} must be >= 1, got {value}")


def _check_texts(texts: Sequence) -> None:
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise TypeError(
            f"inputs at rows {bad[:10]} are not strings (got {type(texts[bad[0]]).__name__})"
        )
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise ValueError(f"inputs at rows {empty[:10]} are empty strings")


def _chat_tokens(
    model: MahalsModel, conversations: Sequence, add_generation_prompt: bool
) -> list[list[int]]:
    if not model.has_chat_template:
        raise ValueError(
            f"model {model.name!r} has no chat template; pass plain texts with chat=False"
        )
    rendered = []
    for i, conversation in enumerate(conversations):
        messages = (
            [{"role": "user", "content": conversation}]
            if isinstance(conversation, str)
            else conversation
        )
        if not messages or not all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError(
                f"input row {i} is not a chat conversation (list of role/content dicts)"
            )
        rendered.append(
            model.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )
    # The template already writes BOS and the role markers.
    return model.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _resolve_layers(model: MahalsModel, layers) -> tuple[int, ...]:
    return select_layers(layers, model.n_layers)


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices of each batch: longest texts first, at most ``batch_size`` texts and (if given)
    at most ``max_batch_tokens`` padded tokens per batch (a longer text goes alone)."""
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be ≥ 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        # Sorted longest first, so the batch's first text sets its padded length.
        fits = (
            current is not None
            and len(current) < batch_size
            and (
                max_batch_tokens is None
                or (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
            )
        )
        if fits:
            current.append(index)
        else:
            batches.append([index])
    return batches


def _sink_free_mask(hidden: Tensor, batch: Batch, sinks: SinkRule, norm_ratio: float) -> Tensor:
    """``[batch, tokens]`` float32 mask of the real tokens a sink-aware mean keeps."""
    mask = batch.token_mask()
    rows = torch.arange(batch.size, device=mask.device)
    keep = mask.clone()
    keep[rows, batch.first] = 0
    if sinks == "norm":
        norms = hidden.float().norm(dim=-1)
        median = torch.where(keep.bool(), norms, torch.nan).nanmedian(dim=-1, keepdim=True).values
        keep = keep * (norms <= norm_ratio * median).float()
    # A text whose every token is a sink keeps them all rather than pooling nothing.
    empty = keep.sum(-1, keepdim=True) == 0
    return torch.where(empty, mask, keep)


def _low_precision_cuda(hidden: Tensor) -> bool:
    return hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)


def _bmm_mask(mask: Tensor, hidden: Tensor) -> Tensor:
    """``mask`` ``[batch, tokens]`` as the ``[batch, 1, tokens]`` operand :func:`_masked_sum` takes."""
    return mask.to(hidden.dtype if _low_precision_cuda(hidden) else torch.float32).unsqueeze(1)


def _masked_sum(mask: Tensor, hidden: Tensor) -> Tensor:
    """``sum_t mask[b, 0, t] * hidden[b, t, :]`` in float32 → ``[batch, d]`` (``mask`` from
    :func:`_bmm_mask`).

    On CUDA a bf16/fp16 ``hidden`` is multiplied as it is, with float32 accumulation and
    output (``bmm(..., out_dtype=float32)``): the 0/1 mask is exact in any dtype, and no float32
    copy of ``[batch, tokens, d]`` is made per layer. Elsewhere ``hidden`` is promoted first.
    """
    if _low_precision_cuda(hidden):
        return torch.bmm(mask, hidden, out_dtype=torch.float32).squeeze(1)
    return torch.bmm(mask, hidden.float()).squeeze(1)


def pooling_reader(pool: str, sinks: SinkRule = "none", norm_ratio: float = 10.0) -> LayerReader:
    """A :data:`mahals.tracing.LayerReader` that pools ``[batch, tokens, d]`` → ``[batch, d]``
    float32 on the device: ``mean`` over real tokens (optionally without attention sinks, see
    :func:`capture`), or the ``last`` / ``first`` real token."""
    return _PoolingReader(pool, sinks, norm_ratio)


class _PoolingReader:
    """See :func:`pooling_reader`. Work that depends only on the batch is done once per batch,
    not once per layer; ``read_many`` pools several layers with one stacked reduction."""

    def __init__(self, pool: str, sinks: SinkRule, norm_ratio: float) -> None:
        self.pool, self.sinks, self.norm_ratio = pool, sinks, norm_ratio
        self._batch: Batch | None = None

    def _prepare(self, hidden: Tensor, batch: Batch) -> None:
        if self._batch is batch:
            return
        self._batch = batch
        self._mask = None
        if self.pool != "mean":
            self._rows = torch.arange(batch.size, device=hidden.device)
        if self.pool == "mean" and self.sinks != "norm":
            # the 0/1 mask converts exactly to any dtype, and its integer counts divide as
            # float32 ones do
            mask = (
                batch.attention_mask
                if self.sinks == "none"
                else _sink_free_mask(hidden, batch, self.sinks, self.norm_ratio)
            )
            self._mask = (_bmm_mask(mask, hidden), mask.sum(-1, keepdim=True))

    def __call__(self, layer: int, hidden: Tensor, batch: Batch) -> Tensor:
        self._prepare(hidden, batch)
        if self.pool == "mean":
            if self._mask is None:  # sinks="norm": which tokens are kept depends on the layer
                mask = _sink_free_mask(hidden, batch, self.sinks, self.norm_ratio)
                return _masked_sum(_bmm_mask(mask, hidden), hidden) / mask.sum(-1, keepdim=True)
            mask, counts = self._mask
            return _masked_sum(mask, hidden) / counts
        return hidden[self._rows, batch.last if self.pool == "last" else batch.first].float()

    def read_many(
        self, layers: Sequence[int], hiddens: Sequence[Tensor], batch: Batch
    ) -> list[Tensor]:
        """Pool ``hiddens`` (``[batch, tokens, d]`` each, one device) in one reduction over
        ``[batch, tokens, layers × d]``; equal to one call per layer."""
        if self.pool == "mean" and self.sinks == "norm":
            return [
                self(layer, hidden, batch) for layer, hidden in zip(layers, hiddens, strict=True)
            ]
        self._prepare(hiddens[0], batch)
        stacked = torch.stack(list(hiddens), dim=2)  # [batch, tokens, layers, d]
        if self.pool == "mean":
            mask, counts = self._mask
            flat = stacked.flatten(2)  # [batch, tokens, layers * d]
            pooled = (_masked_sum(mask, flat) / counts).unflatten(1, stacked.shape[2:])
        else:
            index = batch.last if self.pool == "last" else batch.first
            pooled = stacked[self._rows, index].float()  # [batch, layers, d]
        return LayerReads.of(pooled)


def capture(
    model: MahalsModel,
    inputs,
    *,
    layers: int | Sequence[int] | None = None,
    pool: Pool = "mean",
    sinks: SinkRule = "none",
    sink_norm_ratio: float = 10.0,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    max_length: int | None = None,
    chat: bool = False,
    add_generation_prompt: bool = False,
    padding_side: Literal["right", "left"] = "right",
    interventions: Sequence[Intervention] | None = None,
    progress: bool | None = None,
) -> Activations | TokenActivations:
    """Residual-stream activations of ``inputs`` at the output of decoder layers.

    Args:
        model: from :func:`mahals.load_model`.
        inputs: texts, chat conversations, or pre-tokenised ids (see :func:`tokenize`).
        layers: model-layer indices (negative counts from the end); ``None`` = all layers.
        pool: ``"mean"`` over real tokens, ``"last"`` / ``"first"`` real token, or ``"none"``
            for per-token output (:class:`TokenActivations`; meant for a few texts).
        sinks: attention-sink tokens left out of a ``"mean"`` pool: ``"none"`` keeps every
            token; ``"first"`` drops each text's first token (the sink of most models: BOS, or
            the first word when there is no BOS); ``"norm"`` also drops tokens whose norm at
            that layer exceeds ``sink_norm_ratio`` × the text's median token norm. A text with
            no token left keeps all of its tokens.
        sink_norm_ratio: threshold of ``sinks="norm"`` (a multiple of the median norm).
        batch_size: texts per forward pass; defaults to the registry's batch size or 16.
        max_batch_tokens: also cap each batch's padded size (texts x longest text) at this
            many tokens, which bounds activation memory whatever the text lengths.
        max_length: truncate longer inputs to this many tokens.
        chat: render plain strings as single user turns through the chat template.
        add_generation_prompt: append the assistant header when rendering chat inputs.
        padding_side: how batches are padded; results do not depend on it.
        interventions: writers applied during the forward (:mod:`mahals.tracing`); ``None``
            uses the model's active steering, ``()`` none.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        :class:`Activations` with ``tensor`` float32 CPU ``[n_texts, n_layers, d_model]`` in
        input order, or :class:`TokenActivations` for ``pool="none"``.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}")
    if sinks not in SINK_RULES:
        raise ValueError(f"sinks={sinks!r} is not one of {SINK_RULES}")
    if sinks != "none" and pool != "mean":
        raise ValueError(f"sinks={sinks!r} applies to pool='mean' only, not pool={pool!r}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    layer_ids = _resolve_layers(model, layers)
    _check_positive("batch_size", batch_size)
    _check_positive("max_batch_tokens", max_batch_tokens)
    sequences = tokenize(
        model, inputs, chat=chat, add_generation_prompt=add_generation_prompt, max_length=max_length
    )
    batch_size = batch_size or (model.spec.batch_size if model.spec else 16)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    batches = plan_batches([len(seq) for seq in sequences], batch_size, max_batch_tokens)
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = model.device
    n_tokens = torch.tensor([len(seq) for seq in sequences])
    reader = None if pool == "none" else pooling_reader(pool, sinks, sink_norm_ratio)

    def trace(rows: list[int]) -> tuple[list[Tensor], Batch]:
        batch = Batch.pad(
            [sequences[i] for i in rows], pad_id=pad_id, side=padding_side, device=device
        )
        reads, _ = run_trace(
            model, batch, read_layers=layer_ids, reader=reader, interventions=interventions
        )
        return reads, batch

    if pool == "none":
        per_text: list[Tensor | None] = [None] * len(sequences)
        for rows in batches:
            reads, batch = trace(rows)
            stacked = _stack_on(reads, device)  # [batch, layers, tokens, d]
            for row, index in enumerate(rows):
                real = batch.attention_mask[row].bool()
                per_text[index] = stacked[row][:, real].float().cpu()
        return TokenActivations(per_text, sequences, layer_ids, model.name)

    out = host_result((len(sequences), len(layer_ids), model.d_model))
    with (
        _Staging(out, batches, device, model, layer_ids) as staging,
        tqdm(
            total=len(sequences),
            disable=None if progress is None else not progress,
            desc=f"capture {model.name}",
            unit="text",
        ) as bar,
    ):
        for rows in batches:
            reads, _ = trace(rows)
            staging.add(rows, _stack_on(reads, device))
            bar.update(len(rows))
        staging.finish()
    return Activations(out, layer_ids, pool, n_tokens, model.name, model.n_layers, sinks)


HUGE_PAGE_BYTES = 2 << 20
"""Size of a transparent huge page on x86-64 Linux (and arm64 with 4 KB pages): the alignment
a large result gets."""


def host_result(shape: Sequence[int]) -> Float[Tensor, "..."]:
    """A float32 CPU tensor of ``shape`` for results that arrive over many batches.

    On Linux a result of at least :data:`HUGE_PAGE_BYTES` is an anonymous mapping the kernel
    is asked to back with transparent huge pages (``madvise(MADV_HUGEPAGE)``; honoured unless
    ``/sys/kernel/mm/transparent_hugepage/enabled`` says ``never``): writing it then faults in
    one 2 MB page at a time instead of 512 pages of 4 KB, and freeing it unmaps as many fewer.
    Allocating, writing and freeing the 84 MB result of a 4 x 128 x 40 capture took 37-54 ms
    on 4 KB pages and 14 ms on huge pages (an H200 host): as long as two or three of its
    forward passes of an 8B model. Elsewhere, or smaller: ``torch.empty``. Either way the
    contents start undefined, as ``torch.empty``'s; callers write every element.
    """
    n_bytes = math.prod(shape) * 4
    if n_bytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(tuple(shape), dtype=torch.float32)
    # private: a shared anonymous mapping is shared memory, whose huge pages follow another
    # setting (shmem_enabled, often "never")
    mapping = mmap.mmap(-1, n_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with suppress(OSError):  # a kernel built without transparent huge pages refuses the advice
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE_BYTES  # the first huge-page boundary inside it
    return raw[start : start + n_bytes].view(torch.float32).view(tuple(shape))


def _stack_on(reads: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-layer reads stacked on ``device`` along dim 1 (a model split across GPUs reads each
    layer on that layer's GPU); the reads' own stacked tensor when they carry one
    (:class:`mahals.tracing.LayerReads`)."""
    stacked = getattr(reads, "stacked", None)  # LayerReads
    if stacked is not None and stacked.device == device:
        return stacked
    if all(read.device == device for read in reads):
        return torch.stack(list(reads), dim=1)
    return torch.stack([read.to(device, non_blocking=True) for read in reads], dim=1)


STAGING_BYTES = 1 << 30
"""Most bytes of pooled results a CUDA capture keeps in pinned host memory at once."""

LANDING_BYTES = 64 << 20
"""Bytes of pooled results a CUDA capture moves into its result in one step on its helper
thread (one step per this many bytes, not per batch: each step costs the main thread a
switch of Python's lock, which small batches feel)."""


class _Staging:
    """Pooled batches on their way from the device into ``out`` (rows in input order).

    On CUDA each batch is one asynchronous copy into the next rows of a pinned buffer (in
    the order the batches run) and one on-device sum of its values (NaN or infinite whenever a
    value is): no host work, allocation or synchronisation per batch. Every
    :data:`LANDING_BYTES` of staged rows, and the rows staged before the last batch, go to a
    helper thread with their sums (one copy a step), which waits for their copies, checks the
    sums (naming the layers and rows of a non-finite batch) and moves the rows into ``out``
    while the next batches run; the buffer is reused from its start once every row in it has
    landed. A failure surfaces at the next batch. The last batch lands at :meth:`finish`, after
    the GPU is done (in the calling thread when nothing was handed off: a capture of one batch
    starts no thread), into rows of ``out`` that were zeroed while the GPU worked (by the step
    before it, or by the calling thread before it waits), so that landing does not also fault
    in fresh pages. On the CPU each batch lands directly.
    """

    def __init__(
        self,
        out: Tensor,
        batches: Sequence[list[int]],
        device: torch.device,
        model: MahalsModel,
        layer_ids: Sequence[int],
    ) -> None:
        self.out, self.device, self.model, self.layer_ids = out, device, model, layer_ids
        self.on_cuda = device.type == "cuda"
        row_bytes = max(out.stride(0), 1) * out.element_size()
        largest = max((len(rows) for rows in batches), default=1)
        capacity = max(min(len(out), STAGING_BYTES // row_bytes), largest)
        if self.on_cuda:
            self.buffer = torch.empty((capacity, *out.shape[1:]), dtype=out.dtype, pin_memory=True)
            self.sums = torch.empty(len(batches), dtype=out.dtype, device=device)
            self.host_sums = torch.empty(len(batches), dtype=out.dtype, pin_memory=True)
        self.landing_rows = max(1, LANDING_BYTES // row_bytes)
        self.n_batches = len(batches)
        self.last_rows = list(batches[-1]) if batches else []
        self.segment: list[tuple[int, list[int], int]] = []  # (batch, rows, first buffer row)
        self.used = 0  # buffer rows staged so far
        self.batch = 0
        self.lander: ThreadPoolExecutor | None = None
        self.landing: deque[Future] = deque()

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.lander is not None:
            self.lander.shutdown(wait=True, cancel_futures=True)

    def add(self, rows: list[int], pooled: Tensor) -> None:
        """Stage one batch's pooled ``[batch, layers, d_model]`` block for ``rows``."""
        index, self.batch = self.batch, self.batch + 1
        if not self.on_cuda:
            _check_finite(pooled, rows, self.model, self.layer_ids)
            self.out[rows] = pooled.to(self.out.dtype)
            return
        while self.landing and self.landing[0].done():
            self.landing.popleft().result()
        if self.used + len(rows) > len(self.buffer):  # reuse the buffer once all of it landed
            self._hand_off()
            while self.landing:
                self.landing.popleft().result()
            self.used = 0
        # on pooled's device and its current stream (each op's own device guard)
        torch.sum(pooled, dim=(0, 1, 2), dtype=self.sums.dtype, out=self.sums[index])
        self.buffer[self.used : self.used + len(rows)].copy_(pooled, non_blocking=True)
        self.segment.append((index, rows, self.used))
        self.used += len(rows)
        # a step every landing_rows rows, and one before the last batch: what lands after the
        # GPU is done (at finish) is that batch alone
        before_last = index == self.n_batches - 2
        full = self.used - self.segment[0][2] >= self.landing_rows
        if index < self.n_batches - 1 and (before_last or full):
            self._hand_off(zero_first=self.last_rows if before_last else ())

    def finish(self) -> None:
        """Land every staged row (raises for a non-finite batch)."""
        if not self.on_cuda:
            return
        if self.lander is None and self.segment:
            self._copy_sums(self.segment)
            _zero_rows(self.out, self.last_rows)
            torch.cuda.synchronize(self.device)
            self._land(self.segment, None)
            self.segment = []
        self._hand_off()
        while self.landing:
            self.landing.popleft().result()

    def _copy_sums(self, segment: list[tuple[int, list[int], int]]) -> None:
        """Queue the copy of the sums of ``segment``'s batches to the host."""
        span = _batch_span(segment)
        with torch.cuda.device(self.device):
            self.host_sums[span].copy_(self.sums[span], non_blocking=True)

    def _hand_off(self, zero_first: Sequence[int] = ()) -> None:
        """Hand the staged segment to the landing thread, which first zeroes the rows
        ``zero_first`` of ``out`` (rows that land later)."""
        if not self.segment:
            return
        self._copy_sums(self.segment)
        with torch.cuda.device(self.device):
            done = torch.cuda.Event()
            done.record()
        if self.lander is None:
            self.lander = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mahals-land")
        self.landing.append(self.lander.submit(self._land, self.segment, done, zero_first))
        self.segment = []

    def _land(
        self, segment: list[tuple[int, list[int], int]], done, zero_first: Sequence[int] = ()
    ) -> None:
        _zero_rows(self.out, zero_first)
        if done is not None:
            done.synchronize()
        finite = torch.isfinite(self.host_sums[_batch_span(segment)])
        if not bool(finite.all()):
            for (_, rows, first), batch_finite in zip(segment, finite.tolist(), strict=True):
                if not batch_finite:
                    host = self.buffer[first : first + len(rows)]
                    _check_finite(host, rows, self.model, self.layer_ids)
        order = [row for _, rows, _ in segment for row in rows]
        first = segment[0][2]
        # numpy copies on this thread alone; torch's copy wakes its intra-op thread pool, whose
        # threads then spin (a per-call capture burnt 5-6 times the floor's CPU time)
        self.out.numpy()[order] = self.buffer[first : first + len(order)].numpy()


def _zero_rows(out: Tensor, rows: Sequence[int]) -> None:
    """Write zeros into ``rows`` of ``out`` (host memory). The first write to a page of a
    fresh result faults it in, which made up most of the landing that runs after the GPU is
    done (a 16 × 256 batch: 6.7 ms before, 2.3 ms once its rows are zeroed beforehand, H200
    host). numpy, as in :meth:`_Staging._land`: one thread, Python's lock released."""
    if rows:
        out.numpy()[list(rows)] = 0  # a list: a tuple would index dimensions


def _batch_span(segment: list[tuple[int, list[int], int]]) -> slice:
    """The batch indices of a landing step (consecutive: a step is the batches staged since
    the one before it)."""
    return slice(segment[0][0], segment[-1][0] + 1)


def _check_finite(
    pooled: Tensor, rows: Sequence[int], model: MahalsModel, layer_ids: Sequence[int]
) -> None:
    """Raise if ``pooled`` ``[batch, layers, d_model]`` holds NaN or infinity, naming the
    model, layers and input rows."""
    bad = ~torch.isfinite(pooled)
    if not bool(bad.any()):
        return
    bad = bad.cpu()
    layers = [layer_ids[i] for i in torch.nonzero(bad.any(dim=(0, 2))).flatten().tolist()]
    rows = sorted(rows[i] for i in torch.nonzero(bad.any(dim=(1, 2))).flatten().tolist())
    raise FloatingPointError(
        f"model {model.name!r} ({str(model.dtype).removeprefix('torch.')}) produced NaN or "
        f"infinite activations at layers {layers[:10]} for input rows {rows[:20]}"
        f"{' …' if len(rows) > 20 else ''}: an overflow; load it in bfloat16 or float32 "
        "(load_model(..., dtype=torch.bfloat16))"
    )
