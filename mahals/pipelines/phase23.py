"""Phase 2.3: carry a pair's Phase 2.1 vector to other architectures and judge it there.

Given a *source* pair with Phase 2.1 vectors (``<vectors_dir>/<source>/steering_vector*``) and
*targets* (registry pairs or models; see :mod:`mahals.pipelines.phase23_target`):

1. **Rows.** The source pair's held-out hh-rlhf rows evaluate every agent (Phase 2.2's rule:
   never a row that extracted the vector, only the ``evaluation`` split of a split-built pair;
   a target's native vector may not have used them either). The maps are fitted on other
   rows — disjoint by row hash from the evaluation rows and from every pair's ``evaluation``
   split (checked) — two texts each (chosen and rejected plain transcripts).
2. **Maps** (item ``<target>/map``): pooled activations of the map texts through the source's
   base model and the target's model (cached in ``map_activations/``); one ridge (default),
   Procrustes or CCA map per steered target layer, the layers matched by relative depth
   (default), best linear CKA or explicit pairs; the vector projected; ``cos(projected,
   native)`` per layer next to random source directions pushed through the same maps.
3. **Sweep** (Phase 2.2's scoring, :func:`mahals.pipelines.phase22_pair.score_group`): the
   target's steered model unsteered (``none``), with ``+λ`` × the projected vector, a random
   direction with its per-layer norms and, where the target has a pair with Phase 2.1 vectors,
   its native vector; a pair's tuned model unsteered (``tuned``), for the gap closure. The source
   agent is scored unsteered and with ``+λ_h v`` (its own vector, ``homophily_lambda``).
   Scores: preference margin, gap closure, refusal and over-refusal, KL to the tuned model (to
   the unsteered model for a lone model), perplexity, principled AQI per layer.
4. **Homophily**: the spread across agents of AQI (last layer), refusal, over-refusal and
   margin, unsteered vs steered at ``homophily_lambda`` (the source by its vector, targets by
   the projected one).

Outputs under ``out_dir`` (default ``outputs/phase23_cross_arch_transfer``): per item
``<agent>/<point>/result.json`` (+ ``generations.jsonl``; maps: ``<target>/map/`` with the
mapping, the projected and random vectors and the CKA heatmap); ``transfer_vs_lambda.png``,
``cosine_per_layer.png``, ``homophily.png``; ``phase23_summary.json``; the checkpoint
``phase23_checkpoint.json`` (``--resume`` continues a killed run).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mahals.data.safety import SafetyDataError, load_xstest
from mahals.data.splits import RowOverlapError, rows_sha256
from mahals.evaluation import EvaluationLeakError
from mahals.io import atomic_write_json, tensor_sha256
from mahals.pipelines.caching import cache_identity, cached_capture, model_identity, texts_sha256
from mahals.pipelines.checkpoint import CheckpointChoice, add_checkpoint_flags
from mahals.pipelines.common import RunSummary, require_positive, run_checkpointed, run_command
from mahals.pipelines.console import banner, device_line
from mahals.pipelines.phase2 import default_tokenizer_loader
from mahals.pipelines.phase22 import Phase22Config
from mahals.pipelines.phase22_pair import (
    PairData,
    SweepPoint,
    load_pair_data,
    score_group,
    steered_layers,
    tuned_reference,
    unsteered_aqi,
)
from mahals.pipelines.phase23_report import log_tables, save_figures, summarise
from mahals.pipelines.phase23_target import (
    PROJECTED_FILE,
    RANDOM_FILE,
    Agent,
    agent_data,
    fit_agent_maps,
    forbidden_for_maps,
    map_rows,
    map_rows_record,
    map_texts,
    native_vector,
    resolve_agent,
    target_layers,
)
from mahals.pipelines.slot import ModelLoader, ModelSlot, default_loader, resolve_registry
from mahals.registry import Registry
from mahals.steering import SteeringVector

__all__ = ["Phase23Config", "Phase23Summary", "add_arguments", "demo_config", "run_from_args",
           "run_phase23"]  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.5, 1.0, 2.0, 4.0)
DEFAULT_OUT_DIR = Path("outputs/phase23_cross_arch_transfer")
CHECKPOINT_NAME = "phase23_checkpoint.json"
SUMMARY_NAME = "phase23_summary.json"
MAP_ACTIVATIONS = "map_activations"


@dataclass(frozen=True)
class Phase23Config:
    """Everything that defines a Phase 2.3 run.

    Attributes:
        source: registry pair whose Phase 2.1 vector (in ``vectors_dir``) is carried over.
        targets: registry pair or model keys (a pair's base model is steered).
        dataset, data_dir, split, n_eval, max_chars: the evaluation rows (as Phase 2.2).
        fit_data_dir: hh-rlhf subset of the map rows (default ``data_dir``); ``n_fit`` rows.
        method: ``"ridge"`` (CV-chosen α), ``"procrustes"`` or ``"cca"`` (``rank`` components).
        matching: ``"depth"`` (relative depth) or ``"cka"`` (best linear CKA per target layer);
            ``layer_pairs`` (``(source, target)`` tuples) overrides both.
        layers: steered target layers: ``None`` = the target's last five, ``"all"``, a list.
        lambdas: the sweep's λ (> 0; λ = 0 is the ``none`` point, always scored).
        homophily_lambda: the λ of "after" in the homophily figure (default the largest λ).
        fit_pool: pooling of the map texts (``"mean"``, sink-free, or ``"last"``).
        The scoring fields (``xstest`` … ``batch_size``) mean what they mean in Phase 2.2.
    """

    source: str
    targets: tuple[str, ...]
    vectors_dir: Path | str = Path("outputs/phase2_steering_vectors")
    dataset: str = "Anthropic/hh-rlhf"
    data_dir: str | None = None
    fit_data_dir: str | None = None
    split: str = "test"
    n_eval: int = 200
    n_fit: int = 1000
    max_chars: int | None = None
    method: str = "ridge"
    rank: int = 64
    matching: str = "depth"
    layer_pairs: tuple[tuple[int, int], ...] = ()
    layers: tuple[int, ...] | str | None = None
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    homophily_lambda: float | None = None
    fit_pool: str = "mean"
    xstest: str = "walledai/XSTest"
    aqi_per_cell: int | None = None
    n_generate: int = 100
    max_new_tokens: int = 64
    top_k: int = 256
    n_bootstrap: int = 1000
    aqi_bootstrap: int = 0
    reference_aqi: bool = False
    seed: int = 0
    batch_size: int = 16
    out_dir: Path | str = DEFAULT_OUT_DIR
    checkpoint: CheckpointChoice | None = None

    def __post_init__(self) -> None:
        for name in ("out_dir", "vectors_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        object.__setattr__(
            self, "layer_pairs", tuple((int(s), int(t)) for s, t in self.layer_pairs)
        )
        if not self.targets:
            raise ValueError("targets is empty: name at least one target model or pair")
        if self.source in self.targets:
            raise ValueError(f"the source {self.source!r} cannot also be a target")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError(f"lambdas must be > 0 (λ = 0 is always scored), got {self.lambdas}")
        if self.homophily_lambda is None:
            object.__setattr__(self, "homophily_lambda", max(self.lambdas))
        if self.homophily_lambda not in self.lambdas:
            raise ValueError(
                f"homophily_lambda {self.homophily_lambda} is not one of {self.lambdas}"
            )
        choices = {"method": ("ridge", "procrustes", "cca"), "matching": ("depth", "cka"),
                   "fit_pool": ("mean", "last")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"layers must be a list of ints, 'all' or None, got {self.layers!r}")
        require_positive(self, ("n_eval", "n_fit", "n_generate", "max_new_tokens", "top_k",
                                "batch_size", "rank"))  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """What makes results comparable (checkpointed; a resume must match it)."""
        keep = ("source", "dataset", "data_dir", "fit_data_dir", "split", "n_eval", "n_fit",
                "max_chars", "method", "rank", "matching", "homophily_lambda", "fit_pool", "xstest",
                "aqi_per_cell", "n_generate", "max_new_tokens", "top_k", "n_bootstrap",
                "aqi_bootstrap", "reference_aqi", "seed")  # fmt: skip
        layers = (
            self.layers
            if self.layers is None or isinstance(self.layers, str)
            else list(self.layers)
        )
        return {"targets": list(self.targets), "vectors_dir": str(self.vectors_dir),
                "lambdas": list(self.lambdas), "layers": layers,
                "layer_pairs": [list(p) for p in self.layer_pairs],
                **{name: getattr(self, name) for name in keep}}  # fmt: skip

    def scoring(self) -> Phase22Config:
        """Phase 2.2's configuration of the scores (what :func:`score_group` reads)."""
        shared = ("vectors_dir", "dataset", "data_dir", "split", "n_eval", "max_chars", "xstest",
                  "aqi_per_cell", "n_generate", "max_new_tokens", "top_k", "n_bootstrap",
                  "aqi_bootstrap", "reference_aqi", "seed", "batch_size", "out_dir")  # fmt: skip
        return Phase22Config(pairs=(self.source,), lambdas=(0.0,), controls=False,
                             **{name: getattr(self, name) for name in shared})  # fmt: skip


@dataclass(frozen=True)
class Phase23Summary(RunSummary):
    """What :func:`run_phase23` returns (items are ``<agent>/<point>`` and ``<target>/map``)."""


def _points(
    config: Phase23Config, agent: Agent, steered: tuple[int, ...], native: bool
) -> list[SweepPoint]:
    """An agent's scored points in run order (tuned first: its model makes the KL reference)."""
    points = [SweepPoint("tuned", "tuned", 0.0, "chosen", steered)] if agent.has_pair else []
    points.append(SweepPoint("none", "base", 0.0, "chosen", steered))
    vectors = (
        ("native",)
        if agent.key == config.source
        else ("projected", "random") + (("native",) if native else ())
    )
    lambdas = (config.homophily_lambda,) if agent.key == config.source else config.lambdas
    return points + [
        SweepPoint(f"{v}/lambda_{lam:g}", "base", lam, v, steered)
        for v in vectors
        for lam in lambdas
    ]


@dataclass
class _Run:
    """What the items of one run share."""

    config: Phase23Config
    source: PairData
    agents: dict[str, Agent]
    natives: dict[str, SteeringVector | None]
    texts: list[str]
    tokenizer_loader: Callable[[Any], Any]
    data: dict[str, PairData]
    references: dict[str, Any]
    prefixes: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)


def run_phase23(
    config: Phase23Config,
    *,
    loader: ModelLoader = default_loader,
    registry: Registry | None = None,
    tokenizer_loader: Callable[[Any], Any] = default_tokenizer_loader,
) -> Phase23Summary:
    """Run Phase 2.3 (see the module docstring)."""
    loader, registry = resolve_registry(loader, registry)
    log.info("%s", device_line())
    banner(log, "Phase 2.3: Cross-Architecture Transfer (projected steering vectors)")
    log.info(
        "Source: %s | targets: %s | lambdas: %s",
        config.source,
        list(config.targets),
        list(config.lambdas),
    )
    log.info("Output: %s", config.out_dir)
    scoring = config.scoring()
    aqi = load_xstest(config.xstest, per_cell=config.aqi_per_cell, seed=config.seed)
    source_agent = resolve_agent(config.source, registry)
    source = load_pair_data(source_agent.pair, scoring, aqi, tokenizer_loader)
    source.vectors["native"] = source.vectors["chosen"]
    agents = {key: resolve_agent(key, registry) for key in config.targets}
    natives = {
        key: native_vector(agent, config.vectors_dir, source.eval_rows)
        for key, agent in agents.items()
    }
    rows = map_rows(config, forbidden_for_maps([source_agent, *agents.values()], source.eval_rows))
    run = _Run(config, source, {config.source: source_agent, **agents}, natives, map_texts(rows),
               tokenizer_loader, {config.source: source}, {})  # fmt: skip
    points: dict[str, tuple[str, SweepPoint | None]] = {}
    for key, agent in agents.items():  # the transfer first; the source only anchors homophily
        points[f"{key}/map"] = (key, None)
        steered = target_layers(config, agent.model.n_layers)
        for point in _points(config, agent, steered, natives[key] is not None):
            points[f"{key}/{point.name}"] = (key, point)
    source_layers = steered_layers(scoring, source.vectors["chosen"])
    for point in _points(config, source_agent, source_layers, True):
        points[f"{config.source}/{point.name}"] = (config.source, point)
    shared = {"source_vector_sha256": tensor_sha256(source.vectors["chosen"].vectors),
              "eval_rows_sha256": rows_sha256(source.eval_rows), "map_texts_sha256": texts_sha256(run.texts),
              **model_identity(source_agent.model, "source_model")}  # fmt: skip
    identities = {key: {**shared, **model_identity(agent.model, "model"), **model_identity(agent.pair.tuned, "tuned")}
                  for key, agent in run.agents.items()}  # fmt: skip

    with ModelSlot(loader) as slot:

        def compute(item: str) -> Mapping[str, Any]:
            key, point = points[item]
            log.info("  %s", item)
            if point is None:
                return _fit(run, run.agents[key], slot)
            data = _agent_data(run, key)
            if key not in run.references:
                run.references[key] = tuned_reference(
                    data, scoring, lambda: slot.get(data.pair.tuned, announce="TUNED model")
                )
            model = slot.get(
                data.pair.tuned if point.side == "tuned" else data.pair.base, announce="model"
            )
            below = min(point.layers)
            if (key, point.side, below) not in run.prefixes:
                run.prefixes[key, point.side, below] = unsteered_aqi(
                    data, scoring, model, point.side, below
                )
            prefix = run.prefixes[key, point.side, below]
            return score_group([point], data, scoring, model, run.references[key], prefix)[
                point.name
            ]

        outcome = run_checkpointed(
            out_dir=config.out_dir, checkpoint_name=CHECKPOINT_NAME, items=list(points),
            settings=config.settings(), choice=config.checkpoint, compute=compute,
            identity=lambda item: identities[points[item][0]], item_files=("result.json",),
        )  # fmt: skip
    results = {item: dict(result) for item, result in outcome.results.items()}
    pending = tuple(item for item in points if item not in results)
    data = {"data": source.record, "map_rows": map_rows_record(rows, run.texts)}
    summary = summarise(config, run.agents, results, data)
    log_tables(summary)
    figures = save_figures(config, summary)
    summary_path = atomic_write_json(
        config.out_dir / SUMMARY_NAME, {**summary, "pending": list(pending)}
    )
    log.info("\nSummary: %s", summary_path)
    return Phase23Summary(config.out_dir, summary_path, results, pending, figures)


def _capture(run: _Run, spec: Any, slot: ModelSlot) -> Any:
    config = run.config
    identity = cache_identity(spec, config.fit_pool, run.texts, role="phase23_map", sinks="first")
    return cached_capture(
        config.out_dir / MAP_ACTIVATIONS / f"{spec.key}.safetensors", identity, run.texts,
        lambda: slot.get(spec, announce="model (map texts)"), pool=config.fit_pool, sinks="first",
        batch_size=config.batch_size, max_batch_tokens=None, progress=False, d_model=spec.d_model,
    ).tensor  # fmt: skip


def _fit(run: _Run, agent: Agent, slot: ModelSlot) -> dict[str, Any]:
    source_spec = run.agents[run.config.source].model
    source_states = _capture(run, source_spec, slot)
    target_states = _capture(run, agent.model, slot)
    dataset = (
        f"{run.config.dataset}:{run.config.fit_data_dir or run.config.data_dir or ''}:map rows"
    )
    return fit_agent_maps(
        agent, run.config, run.source.vectors["chosen"], source_states, target_states,
        run.natives[agent.key], run.config.out_dir / agent.key / "map", dataset,
    )  # fmt: skip


def _agent_data(run: _Run, key: str) -> PairData:
    """The agent's scoring data; a target's vectors are read from its ``map`` item's files."""
    if key not in run.data:
        folder = run.config.out_dir / key / "map"
        projected = SteeringVector.load(folder / PROJECTED_FILE)
        # score_group takes the AQI pooling from "chosen": the source vector's, for every agent
        vectors = {
            "chosen": projected,
            "projected": projected,
            "random": SteeringVector.load(folder / RANDOM_FILE),
        }
        if run.natives[key] is not None:
            vectors["native"] = run.natives[key]
        run.data[key] = agent_data(
            run.agents[key], run.source, run.config, vectors, run.tokenizer_loader
        )
    return run.data[key]


def demo_config(
    out_dir: str | Path = "outputs/demo/phase23_cross_arch_transfer",
    *,
    vectors_dir: str | Path = "outputs/demo/phase2_steering_vectors",
    hh_rlhf_root: str | Path | None = None,
    checkpoint: CheckpointChoice | None = None,
) -> Phase23Config:
    """A small offline Phase 2.3 on CPU: the DPO demo pair's vector (run the Phase 2.1 demo
    into ``vectors_dir`` first) carried to Gemma-3-270M; 16 held-out evaluation rows, 64 map
    rows (128 texts), λ ∈ {1, 2} (homophily at λ = 1), XSTest prompts 5 per cell for AQI,
    8 generations of 16 tokens."""
    from mahals.pipelines.demo import DEMO_MAX_CHARS, DEMO_SUBSET, find_demo_hh_rlhf

    hh_rlhf = find_demo_hh_rlhf(hh_rlhf_root)
    return Phase23Config(
        source="SmolLM2_DPO_demo", targets=("gemma-3-270m",), vectors_dir=vectors_dir,
        dataset=str(hh_rlhf), data_dir=DEMO_SUBSET, n_eval=16, n_fit=64, max_chars=DEMO_MAX_CHARS,
        lambdas=(1.0, 2.0), homophily_lambda=1.0, xstest=str(hh_rlhf.parent / "xstest" / "xstest_prompts.csv"),
        aqi_per_cell=5, n_generate=8, max_new_tokens=16, top_k=64, n_bootstrap=500,
        batch_size=16, out_dir=out_dir, checkpoint=checkpoint,
    )  # fmt: skip


# -------------------------------------------------------------------------------------- CLI


def _layers(text: str) -> tuple[int, ...] | str:
    return "all" if text == "all" else tuple(int(x) for x in text.replace(",", " ").split())


def _pair(text: str) -> tuple[int, int]:
    source, target = text.split(":")
    return int(source), int(target)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mahals phase23`` options."""
    parser.add_argument(
        "--source", required=True, help="registry pair whose Phase 2.1 vector is carried"
    )
    parser.add_argument(
        "--targets", nargs="+", metavar="KEY", required=True, help="registry pair or model keys"
    )
    parser.add_argument("--vectors", type=Path, default=Path("outputs/phase2_steering_vectors"),
                        help="Phase 2.1 output folder")  # fmt: skip
    parser.add_argument(
        "--dataset", default="Anthropic/hh-rlhf", help="hh-rlhf hub id or local folder"
    )
    parser.add_argument("--data-dir", help="hh-rlhf subset of the evaluation rows (default: all)")
    parser.add_argument(
        "--fit-data-dir", help="hh-rlhf subset of the map rows (default: --data-dir)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out evaluation rows")
    parser.add_argument("--n-fit", type=int, default=1000, help="map rows (two texts each)")
    parser.add_argument("--max-chars", type=int)
    parser.add_argument("--method", choices=("ridge", "procrustes", "cca"), default="ridge")
    parser.add_argument("--rank", type=int, default=64, help="Procrustes rank / CCA components")
    parser.add_argument("--matching", choices=("depth", "cka"), default="depth")
    parser.add_argument("--layer-pairs", type=_pair, nargs="+", default=(), metavar="S:T",
                        help="explicit (source:target) layer pairs; override --matching and --layers")  # fmt: skip
    parser.add_argument(
        "--layers", type=_layers, help="steered target layers: 'all' or a list (default: last five)"
    )
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument(
        "--homophily-lambda", type=float, help="λ of the homophily figure (default: the largest)"
    )
    parser.add_argument("--fit-pool", choices=("mean", "last"), default="mean")
    parser.add_argument("--xstest", default="walledai/XSTest", help="XSTest csv or hub id")
    parser.add_argument("--aqi-per-cell", type=int, help="XSTest rows per cell (default: all)")
    parser.add_argument("--n-generate", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--reference-aqi", action="store_true", help="also the reference AQI (t-SNE; slow)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    add_checkpoint_flags(parser)


def config_from_args(args: argparse.Namespace) -> Phase23Config:
    return Phase23Config(
        source=args.source, targets=tuple(args.targets), vectors_dir=args.vectors,
        dataset=args.dataset, data_dir=args.data_dir, fit_data_dir=args.fit_data_dir,
        split=args.split, n_eval=args.n_eval, n_fit=args.n_fit, max_chars=args.max_chars,
        method=args.method, rank=args.rank, matching=args.matching,
        layer_pairs=tuple(args.layer_pairs), layers=args.layers, lambdas=tuple(args.lambdas),
        homophily_lambda=args.homophily_lambda, fit_pool=args.fit_pool, xstest=args.xstest,
        aqi_per_cell=args.aqi_per_cell, n_generate=args.n_generate,
        max_new_tokens=args.max_new_tokens, reference_aqi=args.reference_aqi, seed=args.seed,
        batch_size=args.batch_size, out_dir=args.out, checkpoint=args.checkpoint_choice,
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    """``mahals phase23``: 0 on success, 2 with a one-line message on a usage or data error."""
    return run_command("phase23", lambda: config_from_args(args), run_phase23,
                       data_errors=(EvaluationLeakError, SafetyDataError, RowOverlapError))  # fmt: skip
