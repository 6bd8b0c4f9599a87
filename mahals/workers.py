"""The Ray workers a fanned-out phase runs on, and warm workers kept up between runs.

A run's own workers (:class:`Worker`, started by :class:`mahals.cluster.FanOut`) live for the
run: each imports torch, transformers, nnsight and mahals and initialises CUDA when it gets its
first task — 12–14 s on a lent 4 × H200 host, half of a 4-GPU Phase 1 sanity run.

**Warm workers** pay that once per cluster instead of once per run: ``mahals workers up``
starts detached, named Ray actors on a running cluster (``ray start --head`` first), each
holding its GPUs and with the pipelines already imported; a run with ``--ray-address`` on that
cluster uses them and leaves them up; ``mahals workers down`` stops them. While up they hold
their GPUs, idle or not. A warm worker records the :func:`code_fingerprint` of the code it
imported; a run whose own fingerprint differs (mahals edited or reinstalled, other torch /
transformers / nnsight, another ``$MAHALS_REGISTRY``) refuses to use them rather than compute
with stale code. Two runs may share the warm workers (each call runs alone on its worker);
a run into the same output folder is refused as before (the folder's lock). A driver killed
mid-run leaves its running tasks finishing on the warm workers (each writes its item's result
file atomically): a rerun started before they end may compute such an item a second time, and
never mixes the two.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "WARM_NAMESPACE",
    "WarmWorker",
    "Worker",
    "code_fingerprint",
    "find_warm_workers",
    "start_warm_workers",
    "stop_warm_workers",
    "usable_warm_workers",
]

WARM_NAMESPACE = "mahals"
"""Ray namespace of the warm workers; each is named ``mahals-warm-<i>``."""

_WARM_PREFIX = "mahals-warm-"
_DESCRIBE = "describe"
_PIPELINES = ("phase1", "phase2", "phase22", "phase23")
_VERSIONED = ("torch", "transformers", "nnsight")


def code_fingerprint() -> str:
    """What a worker's results depend on besides its tasks, as 16 hex digits: the sha256 of
    every file of the installed ``mahals`` package (sources, registry, shipped adapters), the
    versions of Python, torch, transformers and nnsight, and ``$MAHALS_REGISTRY`` (its path and
    contents)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    files = sorted(
        path for path in package.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    )
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    versions = [sys.version] + [importlib.metadata.version(name) for name in _VERSIONED]
    digest.update("\0".join(versions).encode())
    registry = os.environ.get("MAHALS_REGISTRY")
    if registry:
        digest.update(registry.encode() + b"\0")
        if Path(registry).is_file():
            digest.update(Path(registry).read_bytes())
    return digest.hexdigest()[:16]


class Worker:
    """A Ray actor that computes what it is given, one call at a time. Long-lived, so each
    GPU's process imports torch, initialises CUDA and warms up once per run — or, started
    ``warm``, once per cluster: it imports the pipelines and initialises CUDA when it starts
    and records the fingerprint of the code it imported."""

    def __init__(self, warm: bool = False) -> None:
        logger = logging.getLogger("mahals")
        if not logger.handlers:  # the worker's log reaches the driver's console through Ray
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        self.fingerprint = None
        if warm:
            self.fingerprint = code_fingerprint()
            for name in _PIPELINES:
                importlib.import_module(f"mahals.pipelines.{name}")
            import torch

            if torch.cuda.is_available():
                torch.cuda.init()

    def call(self, function: Callable[[Any], Any], argument: Any) -> Any:
        return function(argument)

    def describe(self) -> dict[str, Any]:
        """The fingerprint it started with, the GPUs it holds, and its host and process."""
        import socket

        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        return {
            "fingerprint": self.fingerprint,
            "gpus": round(resources.get("GPU", 0)),
            "cpus": round(resources.get("CPU", 0)),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }


@dataclass(frozen=True)
class WarmWorker:
    """A warm worker found on the cluster: its Ray actor handle and what it said about itself."""

    name: str
    handle: Any
    fingerprint: str | None
    gpus: int
    cpus: int
    host: str
    pid: int


def _describe(handle):
    """``handle.describe()`` in the warm worker's own concurrency group, so that it answers
    while the worker computes a task (its tasks still run one at a time)."""
    return handle.describe.options(concurrency_group=_DESCRIBE).remote()


def _warm_names() -> list[str]:
    from ray.util import list_named_actors

    return sorted(
        actor["name"]
        for actor in list_named_actors(all_namespaces=True)
        if actor["namespace"] == WARM_NAMESPACE and actor["name"].startswith(_WARM_PREFIX)
    )


def find_warm_workers(ray) -> list[WarmWorker]:
    """The warm workers on the cluster ``ray`` is connected to, by name (none: ``[]``)."""
    names = _warm_names()
    handles = [ray.get_actor(name, namespace=WARM_NAMESPACE) for name in names]
    described = ray.get([_describe(handle) for handle in handles])
    return [
        WarmWorker(name, handle, **facts)
        for name, handle, facts in zip(names, handles, described, strict=True)
    ]


def usable_warm_workers(ray, gpus: int) -> list[WarmWorker]:
    """The warm workers a run that needs ``gpus`` GPUs per worker may use (``[]``: none up).

    Raises:
        ClusterError: warm workers are up but run other code than this process has (their
            fingerprint differs), or hold fewer GPUs each than the run's largest model needs —
            they would hold the GPUs a run's own workers need, so the run cannot go on.
    """
    from mahals.cluster import ClusterError

    warm = find_warm_workers(ray)
    if not warm:
        return []
    here = code_fingerprint()
    stale = sorted({worker.fingerprint for worker in warm if worker.fingerprint != here})
    if stale:
        raise ClusterError(
            f"the warm workers on this cluster run other code (fingerprint {', '.join(stale)}; "
            f"this run's is {here}): restart them with `mahals workers up`, or stop them with "
            "`mahals workers down`"
        )
    small = [worker for worker in warm if worker.gpus < gpus]
    if small:
        raise ClusterError(
            f"this run's largest model needs {gpus} GPU(s) per worker, but the warm workers "
            f"hold {small[0].gpus}: restart them with `mahals workers up --gpus-per-worker "
            f"{gpus}`, or stop them with `mahals workers down`"
        )
    return warm


def start_warm_workers(
    address: str, workers: int | None = None, gpus_per_worker: int | None = None
) -> list[WarmWorker]:
    """Start warm workers on the Ray cluster at ``address`` (stopping any that are up), and
    wait until each has imported the pipelines.

    Args:
        address: the running cluster (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``).
        workers: how many; ``None`` = as many as the cluster's GPUs hold (its CPUs, without
            GPUs).
        gpus_per_worker: GPUs each holds; ``None`` = 1 (0 on a cluster without GPUs).
    """
    from mahals.cluster import ClusterError, capacity_and_cpus

    with _connected(address) as ray:
        _stop(ray)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        has_gpus = any(node.get("GPU") for node in nodes)
        gpus = (1 if gpus_per_worker is None else gpus_per_worker) if has_gpus else 0
        capacity, cpus = capacity_and_cpus(nodes, gpus)
        count = capacity if workers is None else workers
        if not 1 <= count <= capacity:
            raise ClusterError(
                f"the cluster holds {capacity} worker(s) of {gpus} GPU(s) and {cpus} CPU(s) "
                f"each; {count} asked for"
            )
        actor = ray.remote(concurrency_groups={_DESCRIBE: 1})(Worker)
        handles = [
            actor.options(
                name=f"{_WARM_PREFIX}{index}", namespace=WARM_NAMESPACE, lifetime="detached",
                num_gpus=gpus, num_cpus=cpus,
            ).remote(warm=True)
            for index in range(count)
        ]  # fmt: skip
        ray.get([_describe(handle) for handle in handles])
        warm = find_warm_workers(ray)
        log.info(
            "%d warm worker(s) up, %d GPU(s) and %d CPU(s) each, code %s",
            len(warm), gpus, cpus, warm[0].fingerprint,
        )  # fmt: skip
        return warm


def stop_warm_workers(address: str) -> int:
    """Stop the warm workers on the cluster at ``address``; returns how many were up."""
    with _connected(address) as ray:
        return _stop(ray)


def _stop(ray) -> int:
    warm = find_warm_workers(ray)
    for worker in warm:
        ray.kill(worker.handle)
    # A killed actor's name is free once the cluster has seen it die (a moment later).
    deadline = time.monotonic() + 30
    while warm and _warm_names() and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(warm)


@contextmanager
def _connected(address: str) -> Iterator[Any]:
    """``ray``, connected to the cluster at ``address`` while the block runs (a connection this
    process already has is used, and left open)."""
    from mahals.cluster import ClusterError, import_ray

    ray = import_ray()
    connecting = not ray.is_initialized()
    if connecting:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as error:
            raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {error}") from error
    try:
        yield ray
    finally:
        if connecting:
            ray.shutdown()


# ------------------------------------------------------------------------ mahals workers ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument(
        "--ray-address", metavar="auto|ADDR", default="auto",
        help="the running Ray cluster (default auto: the one started on this machine with "
        "`ray start --head`)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None,
        help="up: how many (default: as many as the cluster's GPUs hold)",
    )  # fmt: skip
    parser.add_argument(
        "--gpus-per-worker", type=int, default=None,
        help="up: GPUs each worker holds (default 1): the most any model of your runs needs",
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    if args.action == "up":
        start_warm_workers(args.ray_address, args.workers, args.gpus_per_worker)
    elif args.action == "down":
        log.info("%d warm worker(s) stopped", stop_warm_workers(args.ray_address))
    else:
        with _connected(args.ray_address) as ray:
            warm = find_warm_workers(ray)
        here = code_fingerprint()
        log.info("%d warm worker(s); this installation's code: %s", len(warm), here)
        for worker in warm:
            state = "current" if worker.fingerprint == here else "STALE"
            log.info(
                "%s  %s:%d  %d GPU(s)  code %s (%s)", worker.name, worker.host, worker.pid,
                worker.gpus, worker.fingerprint, state,
            )  # fmt: skip
    return 0
