"""One model in memory at a time: the pipelines load registry models through a :class:`ModelSlot`.

Tests and benchmarks replace the loader (a :data:`ModelLoader`) with one that builds
random-weight models.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from types import TracebackType

from mahals.cluster import placement
from mahals.models import MahalsModel, load_model
from mahals.registry import ModelSpec, Registry, load_registry

__all__ = ["ModelLoader", "ModelSlot", "default_loader", "registry_loader", "resolve_registry"]

log = logging.getLogger(__name__)

ModelLoader = Callable[[ModelSpec], MahalsModel]


def default_loader(spec: ModelSpec) -> MahalsModel:
    """Load a registry model by key (hub, local or PyPI GGUF) from the default registry; a model
    that needs several GPUs (registry ``gpus``) is split across the visible ones, after the
    planner's check that they hold it (:func:`mahals.cluster.placement`)."""
    return load_model(spec.key, **placement(spec))


def _load_from(registry: Registry, spec: ModelSpec) -> MahalsModel:
    return load_model(spec.key, registry=registry, **placement(spec))


def registry_loader(registry: Registry) -> ModelLoader:
    """A loader that looks keys up in ``registry`` rather than ``$MAHALS_REGISTRY``."""
    return functools.partial(_load_from, registry)


def resolve_registry(
    loader: ModelLoader, registry: Registry | None
) -> tuple[ModelLoader, Registry]:
    """The loader and registry a pipeline runs with: a registry given without a loader of
    its own also supplies the models; no registry means the default one."""
    if registry is not None and loader is default_loader:
        loader = registry_loader(registry)
    return loader, registry or load_registry()


class ModelSlot:
    """Holds at most one loaded model: asking for another frees the current one first.

    Use as a context manager (the model held at the end is freed), or call :meth:`release`.
    ``load_seconds`` adds up the time spent in the loader.
    """

    def __init__(self, loader: ModelLoader = default_loader) -> None:
        self._loader = loader
        self._spec: ModelSpec | None = None
        self._model: MahalsModel | None = None
        self.load_seconds = 0.0

    def get(self, spec: ModelSpec, announce: str | None = None) -> MahalsModel:
        """The model of ``spec``, loaded unless it is the one held.

        ``announce`` (e.g. ``"BASE model"``) logs ``  Loading <announce>: <source>`` when a
        load happens.
        """
        if self._model is not None and self._spec == spec:
            return self._model
        self.release()
        if announce is not None:
            log.info("  Loading %s: %s", announce, spec.source)
        started = time.perf_counter()
        self._model = self._loader(spec)
        self._spec = spec
        self.load_seconds += time.perf_counter() - started
        return self._model

    def release(self) -> None:
        """Free the model held, if any."""
        if self._model is not None:
            self._model.free()
        self._model, self._spec = None, None

    def __enter__(self) -> ModelSlot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
