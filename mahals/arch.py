"""Architecture adapters: where each architecture keeps its decoder layers, and how to read them.

Every quirk lives in the table :data:`ADAPTERS` — no other module branches on architecture.
A row says, for one family of ``transformers`` models:

* ``layers`` — dotted path (from the ``*ForCausalLM`` root) of the decoder-layer ``ModuleList``;
* ``final_norm`` / ``embed`` — paths of the final norm and the token embedding;
* ``output_is_tuple`` — whether a decoder layer returns ``(hidden, ...)`` rather than a tensor
  (reading ``output[0]`` of a tensor would silently select batch row 0);
* ``adds_in_place`` — the block updates its residual in place, so saved per-token outputs
  must be cloned;
* ``notes`` — what a researcher should know (embedding scale, dtype hazards).

Unknown architectures fall back to :func:`discover`, which looks for exactly one
``ModuleList`` of ``config.num_hidden_layers`` identical blocks and refuses to guess when it
finds none or several.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "AdapterError",
    "adapter_for",
    "attn_implementation_for",
    "check_adapter",
    "discover",
]


class AdapterError(ValueError):
    """The model's architecture cannot be mapped onto decoder layers unambiguously."""


@dataclass(frozen=True)
class ArchAdapter:
    """How to find and read the residual stream of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    embed: str
    output_is_tuple: bool
    adds_in_place: bool = False
    sdpa_supported: bool = True
    notes: str = ""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return operator.attrgetter(self.layers)(model)

    def unwrap(self, layer_output):
        """The residual-stream tensor ``[batch, tokens, d_model]`` inside a layer's output."""
        return layer_output[0] if self.output_is_tuple else layer_output

    def write(self, layer_output, hidden) -> None:
        """Replace the residual-stream values inside a layer's output with ``hidden``.

        In place, so the value the next block receives is the one written: a tuple output
        cannot be re-assigned element-wise under nnsight, and an in-place copy works for both
        packings.
        """
        residual = self.unwrap(layer_output)
        if residual.shape != hidden.shape:
            raise ValueError(
                f"{self.name}: cannot write hidden states of shape {tuple(hidden.shape)} into a "
                f"layer output of shape {tuple(residual.shape)}"
            )
        residual.copy_(hidden)


_DECODER = {"layers": "model.layers", "final_norm": "model.norm", "embed": "model.embed_tokens"}

ADAPTERS: dict[str, ArchAdapter] = {
    adapter.name: adapter
    for adapter in (
        ArchAdapter("llama", ("llama",), **_DECODER, output_is_tuple=False),
        ArchAdapter(
            "mistral",
            ("mistral",),
            **_DECODER,
            output_is_tuple=False,
            notes="Zephyr-7B is a Mistral fine-tune and uses this row.",
        ),
        ArchAdapter("qwen2", ("qwen2",), **_DECODER, output_is_tuple=False),
        ArchAdapter(
            "gemma2",
            ("gemma2",),
            **_DECODER,
            output_is_tuple=False,
            sdpa_supported=False,
            notes="Embeddings are scaled by sqrt(d_model); activation norms reach the "
            "hundreds, so fp16 overflows: use bf16 or fp32. Attention logits are soft-capped, "
            "which sdpa cannot do: eager or flash-attention 2.",
        ),
        ArchAdapter(
            "gemma3_text",
            ("gemma3_text",),
            **_DECODER,
            output_is_tuple=False,
            notes="Embeddings are scaled by sqrt(d_model); sliding-window and global "
            "attention layers alternate.",
        ),
        ArchAdapter(
            "falcon",
            ("falcon",),
            layers="transformer.h",
            final_norm="transformer.ln_f",
            embed="transformer.word_embeddings",
            output_is_tuple=True,
            adds_in_place=True,
            notes="Parallel attention+MLP (no mid-block residual); the block adds to its "
            "residual in place, so saved per-token states are cloned.",
        ),
    )
}

_BY_MODEL_TYPE = {mt: adapter for adapter in ADAPTERS.values() for mt in adapter.model_types}


def attn_implementation_for(model_type: str, requested: str) -> str:
    """``requested``, or ``"eager"`` when it is sdpa and the architecture cannot use sdpa."""
    adapter = _BY_MODEL_TYPE.get(model_type)
    if requested == "sdpa" and adapter is not None and not adapter.sdpa_supported:
        return "eager"
    return requested


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter for a ``transformers`` causal LM, from the table or by discovery.

    Raises :class:`AdapterError` naming what was found when neither decides.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    return discover(model)


def discover(model: nn.Module) -> ArchAdapter:
    """Infer an adapter for an architecture missing from :data:`ADAPTERS`.

    Looks for exactly one ``nn.ModuleList`` holding ``config.num_hidden_layers`` blocks of one
    class; the final norm is the last norm-like module after it that is not inside it.
    Layer outputs are probed by :func:`check_adapter`, not guessed.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
    }
    candidates = [name for name, module in lists.items() if n_layers in (None, len(module))]
    if len(candidates) != 1:
        found = ", ".join(
            f"{name} ({len(mod)} x {type(mod[0]).__name__})" for name, mod in lists.items()
        )
        raise AdapterError(
            f"cannot locate the decoder layers of model_type={model_type!r}: expected one "
            f"ModuleList of num_hidden_layers={n_layers} blocks, found "
            f"{len(candidates)} candidates among [{found or 'no ModuleLists'}]. "
            "Add a row to mahals.arch.ADAPTERS."
        )
    layers = candidates[0]
    norms = [
        name
        for name, module in model.named_modules()
        if name
        and not name.startswith(layers + ".")
        and (
            "norm" in type(module).__name__.lower()
            or name.rsplit(".", 1)[-1] in ("norm", "ln_f", "final_layernorm", "final_layer_norm")
        )
    ]
    if not norms:
        raise AdapterError(
            f"found decoder layers at {layers!r} for model_type={model_type!r} but no final "
            "norm module; add a row to mahals.arch.ADAPTERS."
        )
    embed = _module_name(model, model.get_input_embeddings())
    adapter = ArchAdapter(
        name=f"discovered:{model_type}",
        model_types=(model_type,),
        layers=layers,
        final_norm=norms[-1],
        embed=embed,
        output_is_tuple=False,
        notes="Discovered automatically; verify with mahals.arch.check_adapter.",
    )
    output_is_tuple = _probe_output_is_tuple(model, adapter)
    return ArchAdapter(**{**adapter.__dict__, "output_is_tuple": output_is_tuple})


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise AdapterError(f"the input embedding of {type(model).__name__} is not one of its modules")


def _probe_output_is_tuple(model: nn.Module, adapter: ArchAdapter) -> bool:
    seen: list[object] = []
    handle = adapter.decoder_layers(model)[0].register_forward_hook(
        lambda _m, _i, out: seen.append(out)
    )
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=_device_of(model)))
    finally:
        handle.remove()
    return isinstance(seen[0], tuple)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_adapter(model: nn.Module, adapter: ArchAdapter | None = None) -> ArchAdapter:
    """Verify an adapter against a real forward pass of ``model`` (nnterp-style conformance).

    Checks that the layer list has ``num_hidden_layers`` entries, that the final norm and
    embedding paths resolve, and that layer outputs really are (or are not) tuples whose first
    element is ``[batch, tokens, d_model]``. Returns the adapter; raises :class:`AdapterError`.
    """
    adapter = adapter or adapter_for(model)
    config = model.config
    try:
        layers = adapter.decoder_layers(model)
        operator.attrgetter(adapter.final_norm)(model)
        operator.attrgetter(adapter.embed)(model)
    except AttributeError as err:
        raise AdapterError(
            f"adapter {adapter.name!r} does not fit {type(model).__name__}: {err}"
        ) from err
    if len(layers) != config.num_hidden_layers:
        raise AdapterError(
            f"adapter {adapter.name!r}: {adapter.layers} has {len(layers)} blocks, "
            f"config.num_hidden_layers={config.num_hidden_layers}"
        )
    if _probe_output_is_tuple(model, adapter) != adapter.output_is_tuple:
        raise AdapterError(
            f"adapter {adapter.name!r} says output_is_tuple={adapter.output_is_tuple}, but "
            f"{type(layers[0]).__name__} returns the opposite under this transformers version"
        )
    return adapter
