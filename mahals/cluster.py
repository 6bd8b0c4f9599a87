"""Scale-out: the study's items on a pool of Ray workers, and how many GPUs each model needs.

With ``--workers N`` (or ``--ray-address auto|ADDR``) a phase runs its pending items (Phase 1
models, Phase 2.1 pairs, Phase 2.2 λ blocks) on Ray, on one machine with several GPUs or on an
existing Ray cluster. The workers are long-lived Ray actors (one process each, so torch, CUDA
and the kernels warm up once per run, not once per task); each reserves ``num_gpus`` = the GPUs
the run's largest model needs (the registry's ``gpus``; 0 on a cluster without GPUs) and its
share of its node's CPUs (:func:`task_cpus`). Ray places the workers; mahals hands each free
worker the next task, and each task writes its items' result files itself
(:func:`mahals.pipelines.common.compute_item`); the driver, which holds the output folder's
lock, derives the checkpoint from those files as tasks finish.

An item may first be split into parts (:class:`Split`; Phase 1: a model's categories, whose
scores depend on their own rows only): the parts run as tasks of their own, grouped so that the
tasks fill the workers evenly (:func:`balanced_groups`: six models on four GPUs give twelve
half-model tasks, where one task per model could not beat 3×), and the item's own task then
only combines their files.

On a cluster where ``mahals workers up`` started warm workers (:mod:`mahals.workers`), a run
uses those instead of starting its own, and leaves them up.

Ray is an optional extra (``pip install 'mahals[cluster]'``). Without it, or with
``--workers 1`` and no address, :func:`fan_out` returns ``None`` and the phase runs its
sequential loop unchanged. On a multi-node cluster the output folder must be on a file system
every node sees, and mahals must be installed on every node.

:func:`check_fits` is the planner's rule: a model needs its registry GPU count, and its
weights (parameters × dtype bytes) must fit in 90% of those GPUs' memory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mahals.registry import ModelSpec
from mahals.workers import Worker, usable_warm_workers

if TYPE_CHECKING:
    from mahals.pipelines.common import ItemTask

__all__ = [
    "ClusterError",
    "FanOut",
    "PlanError",
    "Split",
    "USABLE_MEMORY_FRACTION",
    "balanced_groups",
    "capacity_and_cpus",
    "check_fits",
    "fan_out",
    "import_ray",
    "local_gpu_memory",
    "parameter_count",
    "ray_available",
    "task_cpus",
    "task_gpus",
    "weight_bytes",
]

log = logging.getLogger(__name__)

USABLE_MEMORY_FRACTION = 0.9
"""Share of a GPU's memory the weights may take; the rest holds activations and CUDA context."""

ItemModels = Callable[[str], Sequence[ModelSpec]]
"""An item → the models its task loads (one at a time)."""


class PlanError(ValueError):
    """A task cannot fit the GPUs it was given (the message names the numbers)."""


class ClusterError(RuntimeError):
    """Ray is needed but missing, or the cluster cannot be reached."""


def ray_available() -> bool:
    """Whether the optional ``ray`` package is installed."""
    return importlib.util.find_spec("ray") is not None


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of ``spec``: the registry's ``billion_params`` when given, else an estimate
    from the shape, ``12 · n_layers · d_model²`` (attention 4d², MLP 8d²; no embeddings)."""
    if spec.billion_params is not None:
        return round(spec.billion_params * 1e9)
    return 12 * spec.n_layers * spec.d_model**2


def weight_bytes(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of ``spec``'s weights in ``dtype``: :func:`parameter_count` × the dtype's size."""
    return parameter_count(spec) * torch.empty((), dtype=dtype).element_size()


def check_fits(
    spec: ModelSpec,
    gpus_given: int,
    gpu_memory: int | None,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Refuse (:class:`PlanError`) a task for ``spec`` that cannot fit ``gpus_given`` GPUs of
    ``gpu_memory`` bytes each (``None``: not known, only the GPU count is checked).

    The task needs the registry's ``gpus`` GPUs, and the weights (:func:`weight_bytes`) must
    fit in :data:`USABLE_MEMORY_FRACTION` of their memory together.
    """
    if spec.gpus > gpus_given:
        raise PlanError(
            f"model {spec.key!r} needs {spec.gpus} GPUs (registry 'gpus'), but its task was "
            f"given {gpus_given}: run it on a machine or Ray node with at least {spec.gpus} GPUs"
        )
    if gpu_memory is None or gpus_given == 0:
        return
    needed = weight_bytes(spec, dtype)
    usable = USABLE_MEMORY_FRACTION * gpus_given * gpu_memory
    if needed > usable:
        size = torch.empty((), dtype=dtype).element_size()
        raise PlanError(
            f"model {spec.key!r} does not fit: {parameter_count(spec) / 1e9:.1f} B parameters × "
            f"{size} bytes ({str(dtype).removeprefix('torch.')}) = {needed / 2**30:.1f} GiB of "
            f"weights, but {gpus_given} GPU(s) × {gpu_memory / 2**30:.1f} GiB give "
            f"{usable / 2**30:.1f} GiB usable ({USABLE_MEMORY_FRACTION:.0%}); raise the model's "
            f"'gpus' in the registry"
        )


def local_gpu_memory() -> int | None:
    """Memory in bytes of this process's first visible GPU (``None`` without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def placement(spec: ModelSpec) -> dict[str, Any]:
    """``load_model`` keywords for ``spec`` in this process: ``device_map="auto"`` for a
    model that needs several GPUs, after :func:`check_fits` on the visible GPUs."""
    if not torch.cuda.is_available():
        return {}
    check_fits(spec, torch.cuda.device_count(), local_gpu_memory())
    return {"device_map": "auto"} if spec.gpus > 1 else {}


@dataclass(frozen=True)
class Split:
    """How an item's work splits into parts that run first, spread over the workers (Phase 1:
    a model's categories, each captured and scored on its own; the item then only combines).

    Attributes:
        parts: an item → its parts still to compute (empty: the item runs as one task).
        compute: computes a group of one item's parts in a worker, writing their files.
        weight: a part → its relative cost (rows), for balancing the groups.
    """

    parts: Callable[[str], Sequence[Any]]
    compute: Callable[[Sequence[Any]], None]
    weight: Callable[[Any], float] = lambda part: 1.0


@dataclass(frozen=True)
class FanOut:
    """Runs a phase's pending items on a pool of Ray workers (see the module docstring).

    Attributes:
        workers: workers at once; ``None`` = as many as the cluster's resources hold.
        address: Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` = start a local Ray on this machine (unless one is running in this process).
        models: an item → the models its task loads (for its GPU count and the fit check).
        group: an item → its task: items of one group run in one task, in order (a λ block
            on one model); ``None`` = one task per item.
    """

    workers: int | None
    address: str | None
    models: ItemModels
    group: Callable[[str], str] | None = None

    def run(
        self,
        compute: Callable[[str], Mapping[str, Any]],
        tasks: Sequence[ItemTask],
        finished: Callable[[str, Mapping[str, Any]], None],
        split: Split | None = None,
    ) -> None:
        """Run ``tasks`` on Ray workers; ``finished(item, entry)`` for each item, as its task
        ends. With ``split``, an item's parts run first, in balanced groups on any free
        worker (:func:`balanced_groups`), and the item's own task once they are all done.

        A task's failure stops the run with that task's exception (items that other tasks
        finished keep their result files).
        """
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                # "local": a Ray of this run's own, even if another one runs on this machine
                ray.init(address=self.address or "local", include_dashboard=False)
            except ConnectionError as error:
                raise ClusterError(
                    f"cannot reach the Ray cluster at {self.address!r}: {error}"
                ) from error
        try:
            self._run(ray, compute, tasks, finished, split)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray, compute, tasks, finished, split) -> None:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        groups: dict[str, list[ItemTask]] = {}
        for task in tasks:
            groups.setdefault(self.group(task.item) if self.group else task.item, []).append(task)
        node_gpus = max((int(node.get("GPU", 0)) for node in nodes), default=0)
        gpus = max(
            task_gpus(
                [spec for task in group for spec in self.models(task.item)],
                node_gpus,
                local_gpu_memory(),
            )
            for group in groups.values()
        )
        warm = usable_warm_workers(ray, gpus)
        if warm:
            capacity, cpus = len(warm), warm[0].cpus
        else:
            capacity, cpus = capacity_and_cpus(nodes, gpus)
        if capacity < 1:
            raise ClusterError(f"no Ray node can hold a worker of {gpus} GPU(s) and {cpus} CPU(s)")
        slots = min(self.workers or capacity, capacity)
        part_groups = {}
        if split is not None:
            owners = {
                name: [part for task in group for part in split.parts(task.item)]
                for name, group in groups.items()
            }
            part_groups = balanced_groups(
                {name: parts for name, parts in owners.items() if parts}, split.weight, slots
            )
        # Parts in item order, so items finish one after another; an item whose parts are done
        # goes before any further part.
        part_queue = [(name, parts) for name in groups for parts in part_groups.get(name, [])]
        item_queue = [name for name in groups if name not in part_groups]
        outstanding = {name: len(parts) for name, parts in part_groups.items()}
        n_workers = min(slots, len(part_queue) + len(item_queue))
        log.info(
            "Ray: %d %sworker(s) of %d GPU(s) and %d CPU(s) for %d item(s) in %d task(s)%s",
            n_workers, "warm " if warm else "", gpus, cpus, len(tasks), len(groups),
            f", first {len(part_queue)} part task(s)" if part_queue else "",
        )  # fmt: skip
        if warm:
            workers = [worker.handle for worker in warm[:n_workers]]
        else:
            actor = ray.remote(Worker)
            workers = [
                actor.options(num_gpus=gpus, num_cpus=cpus).remote() for _ in range(n_workers)
            ]
        item_function = ray.put(functools.partial(_run_group, compute))
        part_function = ray.put(split.compute) if split is not None else None
        idle, in_flight = list(workers), {}
        try:
            while item_queue or part_queue or in_flight:
                while idle and (item_queue or part_queue):
                    worker = idle.pop()
                    if item_queue:
                        name = item_queue.pop(0)
                        ref = worker.call.remote(item_function, groups[name])
                        in_flight[ref] = ("item", name, worker)
                    else:
                        name, parts = part_queue.pop(0)
                        ref = worker.call.remote(part_function, parts)
                        in_flight[ref] = ("parts", name, worker)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    kind, name, worker = in_flight.pop(ref)
                    result = ray.get(ref)
                    idle.append(worker)
                    if kind == "item":
                        for task, entry in zip(groups[name], result, strict=True):
                            finished(task.item, entry)
                    else:
                        outstanding[name] -= 1
                        if outstanding[name] == 0:
                            item_queue.append(name)
        finally:
            for worker in workers if not warm else ():
                ray.kill(worker)


def balanced_groups(
    owners: Mapping[str, Sequence[Any]], weight: Callable[[Any], float], slots: int
) -> dict[str, list[list[Any]]]:
    """Each owner's parts (a model's categories) in ``g`` groups, one task each, so that the
    ``len(owners) · g`` tasks fill ``slots`` workers evenly: ``g = slots / gcd(len(owners),
    slots)``, at most one group per part. Within an owner, the heaviest part goes to the
    lightest group first (weights: ``weight(part)``); empty groups are dropped.

    Six models on four workers: two groups each, twelve tasks, three per worker (at most 3×
    with one task per model, 4× like this).
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    n_groups = slots // math.gcd(len(owners), slots) if owners else 1
    grouped = {}
    for owner, parts in owners.items():
        bins: list[list[Any]] = [[] for _ in range(min(n_groups, len(parts)))]
        loads = [0.0] * len(bins)
        for part in sorted(parts, key=weight, reverse=True):
            lightest = loads.index(min(loads))
            bins[lightest].append(part)
            loads[lightest] += weight(part)
        grouped[owner] = [group for group in bins if group]
    return grouped


def task_cpus(gpus: int, cpus_per_gpu: int) -> int:
    """CPUs to reserve for a task of ``gpus`` GPUs: its share of its node's CPUs
    (``cpus_per_gpu``: the fewest any GPU node has per GPU), at least one.

    Ray gives a task as many OpenMP / torch threads as it reserves CPUs: with one, the task's
    CPU work (tokenising, pooling on the host, AQI folds on a CPU) would run on one thread.
    """
    return max(1, gpus * cpus_per_gpu)


def task_gpus(specs: Sequence[ModelSpec], node_gpus: int, gpu_memory: int | None) -> int:
    """GPUs to reserve for a task that loads ``specs`` (one at a time) on a cluster whose
    largest node has ``node_gpus``: what its largest model needs, 0 on a cluster without GPUs.

    Raises:
        PlanError: a model needs more GPUs than any node has, or its weights do not fit the
            memory of the GPUs it needs (``gpu_memory`` bytes each; ``None``: not checked).
    """
    if node_gpus == 0:
        return 0
    for spec in specs:
        check_fits(spec, node_gpus, None)  # some node has the GPUs it needs
        check_fits(spec, spec.gpus, gpu_memory)  # and they hold its weights
    return max((spec.gpus for spec in specs), default=1)


def _run_group(compute: Callable[[str], Mapping[str, Any]], tasks: Sequence[ItemTask]) -> list:
    """In a Ray worker: compute each item of one task in order, each writing its result file."""
    from mahals.pipelines.common import compute_item

    return [compute_item(compute, task) for task in tasks]


def capacity_and_cpus(nodes: Sequence[Mapping[str, Any]], gpus: int) -> tuple[int, int]:
    """How many workers of ``gpus`` GPUs the Ray ``nodes`` (their resources) hold at once, and
    the CPUs each reserves (:func:`task_cpus`)."""
    cpus_per_gpu = min(
        (int(node.get("CPU", 1)) // int(node["GPU"]) for node in nodes if node.get("GPU")),
        default=1,
    )
    cpus = task_cpus(gpus, cpus_per_gpu)
    capacity = sum(
        int(node.get("CPU", 0)) // cpus
        if not gpus
        else min(int(node.get("CPU", 0)) // cpus, int(node.get("GPU", 0)) // gpus)
        for node in nodes
    )
    return capacity, cpus


def import_ray():
    """The ``ray`` module, or :class:`ClusterError` naming the extra that installs it."""
    try:
        import ray
    except ImportError as error:
        raise ClusterError("--ray-address needs Ray: pip install 'mahals[cluster]'") from error
    return ray


def fan_out(
    workers: int | None,
    address: str | None,
    models: ItemModels,
    group: Callable[[str], str] | None = None,
) -> FanOut | None:
    """The :class:`FanOut` that ``--workers`` / ``--ray-address`` ask for, or ``None`` for the
    sequential loop: ``--workers 1`` without an address, or several workers without Ray
    installed (logged). An address without Ray raises :class:`ClusterError`."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if address is None and (workers is None or workers == 1):
        return None
    if not ray_available():
        if address is not None:
            import_ray()
        log.warning(
            "--workers %d: Ray is not installed (pip install 'mahals[cluster]'); running the "
            "items one after another",
            workers,
        )
        return None
    return FanOut(workers, address, models, group)
