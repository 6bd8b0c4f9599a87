"""Phase 2.3 for one agent: who it is, the rows that fit its maps, the maps, and its data.

An *agent* is a model the source vector is carried to: a registry pair (its base model is
steered, its tuned model is the alignment reference, its own Phase 2.1 vector is the *native*
vector) or a lone registry model (steered; no tuned sibling, so no gap closure, and the KL is
taken to the model itself unsteered).

The maps are fitted on *map rows*: hh-rlhf rows disjoint, by row hash, from every evaluation
row and from every pair's ``evaluation`` split; each row gives two texts (the plain chosen and
rejected transcripts), run through the source's base model and the agent's model and pooled
per text (the tokenisers differ). :func:`fit_agent_maps` fits one map per steered target layer
(:class:`~mahals.transfer.LayerMapping`), projects the source vector, and measures the
projection against the native vector and a random control.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mahals.data.hh_rlhf import PreferencePair, Turn, format_conversation, load_hh_rlhf
from mahals.data.splits import assert_disjoint, row_hash, rows_sha256
from mahals.evaluation import check_disjoint_rows
from mahals.io import atomic_write_json
from mahals.pairs import pair_row_splits
from mahals.pipelines.phase2_pair import vector_files
from mahals.pipelines.phase22_pair import PairData, _prompt, _random_like, _styles
from mahals.registry import ModelPair, ModelSpec, Registry, RegistryError
from mahals.steering import SteeringVector
from mahals.transfer import LayerMapping, cka_heatmap, cka_matrix, match_by_cka, match_by_depth

if TYPE_CHECKING:
    from mahals.pipelines.phase23 import Phase23Config

__all__ = [
    "Agent",
    "agent_data",
    "fit_agent_maps",
    "map_rows",
    "map_texts",
    "resolve_agent",
    "target_layers",
]

log = logging.getLogger(__name__)

MAPPING_FILE = "mapping.safetensors"
PROJECTED_FILE = "projected_vector.safetensors"
RANDOM_FILE = "random_vector.safetensors"
N_RANDOM_SOURCE_DIRECTIONS = 100


@dataclass(frozen=True)
class Agent:
    """A model the vector is applied to.

    Attributes:
        key: registry pair or model key (also its output folder).
        pair: the registry pair, or a stand-in whose base and tuned are both the lone model.
        has_pair: whether ``key`` is a real pair (a tuned sibling and possibly a native vector).
    """

    key: str
    pair: ModelPair
    has_pair: bool

    @property
    def model(self) -> ModelSpec:
        """The model that is steered (a pair's base)."""
        return self.pair.base


def resolve_agent(key: str, registry: Registry) -> Agent:
    """The agent of a registry pair key or model key (a pair key wins; unknown keys raise)."""
    if key in registry.pairs:
        return Agent(key, registry.pair(key), True)
    if key in registry.models:
        spec = registry.model(key)
        return Agent(key, ModelPair(key, key, spec, spec, tuning="none"), False)
    raise RegistryError(f"unknown agent {key!r}: neither a pair nor a model of the registry")


def native_vector(
    agent: Agent, vectors_dir: Path, eval_rows: Sequence[PreferencePair]
) -> SteeringVector | None:
    """The agent's own Phase 2.1 vector, when it is a pair with one in ``vectors_dir``; refused
    (:class:`~mahals.evaluation.EvaluationLeakError`) if it was extracted on an evaluation row."""
    chosen_file, _, _ = vector_files(0)
    path = vectors_dir / agent.key / chosen_file
    if not agent.has_pair or not path.is_file():
        return None
    native = SteeringVector.load(path)
    check_disjoint_rows(
        [row_hash(row) for row in eval_rows], native.extra.get("row_sha256") or (),
        what=f"{agent.key} native vector",
    )  # fmt: skip
    return native


def target_layers(config: Phase23Config, n_layers: int) -> tuple[int, ...]:
    """The agent's steered layers: the explicit pairs' targets, else ``config.layers`` (``None``
    = the last five, ``"all"``, or a list)."""
    if config.layer_pairs:
        return tuple(sorted({t for _, t in config.layer_pairs}))
    if config.layers is None:
        return tuple(range(max(0, n_layers - 5), n_layers))
    if config.layers == "all":
        return tuple(range(n_layers))
    outside = [layer for layer in config.layers if not 0 <= layer < n_layers]
    if outside:
        raise ValueError(f"layers {outside} are outside the target's 0..{n_layers - 1}")
    return tuple(sorted(config.layers))


def forbidden_for_maps(
    agents: Iterable[Agent], eval_rows: Sequence[PreferencePair]
) -> frozenset[str]:
    """Row hashes map rows must avoid: the evaluation rows and every pair's evaluation split."""
    forbidden = {row_hash(row) for row in eval_rows}
    for agent in agents:
        splits = pair_row_splits(agent.pair) if agent.has_pair else None
        if splits is not None:
            forbidden |= splits.split_of("evaluation")
    return frozenset(forbidden)


def map_rows(config: Phase23Config, forbidden: frozenset[str]) -> list[PreferencePair]:
    """The first ``config.n_fit`` distinct rows of the map data whose hash is not ``forbidden``
    (and whose two texts, :func:`map_texts`, are at most ``config.max_chars`` long)."""
    dataset = load_hh_rlhf(
        config.dataset, data_dir=config.fit_data_dir or config.data_dir, split=config.split,
        verbose=False,
    )  # fmt: skip
    rows, seen = [], set(forbidden)
    for row in dataset:
        texts = map_texts([row])
        if config.max_chars is not None and max(map(len, texts)) > config.max_chars:
            continue
        if row_hash(row) not in seen:
            seen.add(row_hash(row))
            rows.append(row)
        if len(rows) == config.n_fit:
            break
    if len(rows) < 10:
        raise FileNotFoundError(
            f"{len(rows)} hh-rlhf rows disjoint from the evaluation rows in {dataset.source}; "
            "the maps need at least 10"
        )
    assert_disjoint(rows, forbidden, what="map-fitting rows")
    return rows


def map_texts(rows: Sequence[PreferencePair]) -> list[str]:
    """Two texts per row: its plain chosen and rejected transcripts (both answers' content)."""
    return [format_conversation(row, side, style="plain") for row in rows for side in ("chosen", "rejected")]  # fmt: skip


def agent_data(
    agent: Agent,
    source: PairData,
    config: Phase23Config,
    vectors: dict[str, SteeringVector],
    tokenizer_loader: Callable[[ModelSpec], Any],
) -> PairData:
    """The agent's :class:`PairData` for Phase 2.2's scoring: the source's evaluation rows and
    XSTest prompts, formatted as the agent reads them (its pair's rule; a lone model reads chat
    when it has a template, plain otherwise). ``vectors["chosen"]`` sets the AQI pooling."""
    native = vectors.get("native")
    if agent.has_pair:
        rule = (
            (native.extra.get("pairing") if native else None)
            or agent.pair.pairing
            or "shared-template"
        )
    else:
        rule = "shared-template" if agent.model.chat else "plain"
    styles = _styles(agent.pair, rule)
    tokenizer = tokenizer_loader(agent.pair.tuned) if "chat" in styles.values() else None
    prompts = {side: [_prompt(row, style, tokenizer) for row in source.eval_rows]
               for side, style in styles.items()}  # fmt: skip
    aqi_prompts = {
        side: [_prompt(PreferencePair((Turn("user", text),), "", "", i), style, tokenizer)
               for i, text in enumerate(source.aqi.texts)]
        for side, style in styles.items()
    }  # fmt: skip
    record = {**source.record, "pairing": rule, "styles": styles, "agent_has_pair": agent.has_pair}
    return replace(source, pair=agent.pair, folder=config.out_dir / agent.key, vectors=vectors,
                   prompts=prompts, aqi_prompts=aqi_prompts, record=record)  # fmt: skip


def _restricted(vector: SteeringVector, layers: Sequence[int]) -> SteeringVector:
    rows = torch.stack([vector.layer(layer) for layer in layers])
    return replace(vector, vectors=rows, layers=tuple(layers))


def _layer_pairs(
    config: Phase23Config, steered: Sequence[int], cka: Tensor
) -> tuple[tuple[int, int], ...]:
    if config.layer_pairs:
        return tuple(config.layer_pairs)
    if config.matching == "cka":
        return match_by_cka(cka, select=steered)
    return match_by_depth(cka.shape[0], cka.shape[1], target_layers=steered)


def _relative_norms(vector: Tensor, states: Tensor) -> Tensor:
    """``‖v‖ / mean‖h‖`` per row: a shift's size in units of the layer's typical state."""
    return vector.double().norm(dim=-1) / states.double().norm(dim=-1).mean(dim=0)


def fit_agent_maps(
    agent: Agent,
    config: Phase23Config,
    source_vector: SteeringVector,
    source_states: Tensor,
    target_states: Tensor,
    native: SteeringVector | None,
    folder: Path,
    dataset: str,
) -> dict[str, Any]:
    """Fit the agent's maps, project the source vector, and compare it per layer.

    ``source_states`` / ``target_states`` are the map texts' pooled activations ``[n, layer,
    d]`` (all layers). Writes ``mapping.safetensors``, ``projected_vector.safetensors``,
    ``random_vector.safetensors`` (the random control: the projected vector's per-layer norms),
    ``cka_heatmap.png`` and ``result.json`` into ``folder``; returns the result. Per target
    layer: source layer, held-out R² and centred cosine, CKA, ``‖v‖ / mean‖h‖`` of the source
    and projected vectors, and where a native vector exists ``cos(projected, native)`` next to
    the mean ``|cos|`` of :data:`N_RANDOM_SOURCE_DIRECTIONS` random source directions pushed
    through the same maps (what an uninformative source direction would reach).
    """
    steered = target_layers(config, target_states.shape[1])
    cka = cka_matrix(source_states, target_states)
    pairs = _layer_pairs(config, steered, cka)
    options = {"rank": config.rank} if config.method == "procrustes" else (
        {"n_components": config.rank} if config.method == "cca" else {})  # fmt: skip
    mapping = LayerMapping.fit(
        source_states, target_states, pairs, method=config.method, seed=config.seed,
        source_model=source_vector.base_model, target_model=agent.model.key, dataset=dataset,
        **options,
    )  # fmt: skip
    mapping.save(folder / MAPPING_FILE)
    projected = mapping.project(source_vector)
    projected.save(folder / PROJECTED_FILE)
    random = _random_like(projected, config.seed)
    random.save(folder / RANDOM_FILE)
    cka_heatmap(cka, pairs=pairs, source_name=source_vector.base_model or "source",
                target_name=agent.model.key, path=folder / "cka_heatmap.png")  # fmt: skip
    sources = [s for s, _ in pairs]
    rows = torch.stack([source_vector.layer(s) for s in sources])
    source_norms = _relative_norms(rows, source_states[:, sources])
    projected_norms = _relative_norms(projected.vectors, target_states[:, list(steered)])
    per_layer = []
    for index, ((s, t), fitted) in enumerate(zip(pairs, mapping.maps, strict=True)):
        quality = fitted.quality
        per_layer.append({
            "target_layer": t, "source_layer": s, "cka": float(cka[s, t]),
            "held_out_r2": quality.r2 if quality else None,
            "held_out_centered_cosine": quality.mean_centered_cosine if quality else None,
            "relative_norm_source": float(source_norms[index]),
            "relative_norm_projected": float(projected_norms[index]),
        })  # fmt: skip
    if native is not None:
        native_rows = _restricted(native, steered)
        generator = torch.Generator().manual_seed(config.seed)
        draws = torch.randn(N_RANDOM_SOURCE_DIRECTIONS, mapping.d_source, generator=generator,
                            dtype=torch.float64)  # fmt: skip
        for entry, cos, fitted, target in zip(
            per_layer,
            projected.cosine(native_rows).tolist(),
            mapping.maps,
            native_rows.vectors,
            strict=True,
        ):
            pushed = draws @ fitted.weight.double()
            control = torch.nn.functional.cosine_similarity(pushed, target.double()[None], dim=-1)
            entry["cos_projected_native"] = cos
            entry["mean_abs_cos_random_source_native"] = float(control.abs().mean())
    result = {
        "agent": agent.key, "target_model": agent.model.key, "method": config.method,
        "matching": "explicit" if config.layer_pairs else config.matching,
        "pairs": [list(pair) for pair in pairs], "n_texts": int(source_states.shape[0]),
        "mean_held_out_r2": sum(e["held_out_r2"] or 0.0 for e in per_layer) / len(per_layer),
        "has_native": native is not None, "layers": per_layer,
    }  # fmt: skip
    atomic_write_json(folder / "result.json", result)
    return result


def map_rows_record(rows: Sequence[PreferencePair], texts: Sequence[str]) -> dict[str, Any]:
    """What the map rows were (recorded in the summary)."""
    return {"rows": len(rows), "texts": len(texts), "rows_sha256": rows_sha256(rows),
            "source_rows": [row.source_index for row in rows]}  # fmt: skip
