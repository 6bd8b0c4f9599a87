"""The XSTest table of docs/aqi.md: mahalanobis vs geometry vs a logistic probe, per category and
layer, for the two small demo models, with the surface baselines, sink-free pooling, the
category-centred overall and shuffled-label controls; and the headline of
``mahals.aqi.evaluate(model, dataset)`` with its defaults (what Phase 1 and the README report).

    HF_HUB_OFFLINE=1 python benchmarks/aqi_xstest_table.py                 # both models, CPU
    HF_HUB_OFFLINE=1 python benchmarks/aqi_xstest_table.py --model SmolLM2-135M-Instruct

Prints markdown (one table per model, then summary lines). Layers: first, middle, last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import mahals
from mahals.aqi import CENTRED_OVERALL, OVERALL, embedding_features, evaluate_activations
from mahals.data import load_xstest

DEFAULT_XSTEST = Path("../shared/data/xstest/xstest_prompts.csv")
MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")


def probe_auc(x: np.ndarray, unsafe: np.ndarray) -> float:
    """Mean held-out ROC-AUC of a standardised logistic probe, 5 shuffled stratified folds."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=42)
    return float(cross_val_score(probe, x, unsafe, cv=folds, scoring="roc_auc").mean())


def table(name: str, xstest: Path, shuffles: int) -> None:
    model = mahals.load_model(name)
    dataset = load_xstest(xstest)
    texts, axioms, labels = list(dataset.texts), list(dataset.axioms), list(dataset.labels)
    n_layers = model.n_layers
    layers = [0, n_layers // 2, n_layers - 1]
    mean = mahals.capture(model, texts, pool="mean", sinks="none", layers=layers)
    sink_free = mahals.capture(model, texts, pool="mean", sinks="first", layers=layers)
    options = {
        "axioms": axioms,
        "labels": labels,
        "layer_ids": mean.layers,
        "model_name": model.name,
    }
    report = evaluate_activations(
        mean.tensor,
        n_tokens=mean.n_tokens,
        baselines={"embedding": embedding_features(model, texts)},
        centred_overall=True,
        **options,
    )
    free = evaluate_activations(sink_free.tensor, n_bootstrap=0, centred_overall=True, **options)
    geometry = evaluate_activations(mean.tensor, mode="geometry", n_bootstrap=0, **options)
    unsafe = np.array([label == "unsafe" for label in labels])
    activations = mean.tensor.double().numpy()
    probes = {
        axiom: [
            probe_auc(activations[np.array(axioms) == axiom, i], unsafe[np.array(axioms) == axiom])
            for i in range(len(layers))
        ]
        for axiom in report.axioms
    }
    probes[OVERALL] = list(np.mean([probes[a] for a in report.axioms], axis=0))

    print(
        f"#### {report.model} (d = {report.settings['d']}, {n_layers} layers; layers "
        f"{', '.join(map(str, report.layers))})\n"
    )
    print(
        "| category (n safe/unsafe) | layer | mahalanobis [95% CI] | AUC | η² | sink-free pooling "
        "| length baseline | embedding baseline | geometry | probe AUC |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for category in [*report.axioms, OVERALL, CENTRED_OVERALL]:
        score, other = report[category], free[category]
        for i, layer in enumerate(report.layers):
            head = f"{category} ({score.n_safe}/{score.n_unsafe})" if i == 0 else ""
            baselines = (
                f"{score.baselines['length']:.1f} | {score.baselines['embedding']:.1f}"
                if i == 0
                else " | "
            )
            geometry_cell = (
                f"{geometry[category].layer_aqi[i]:.2f}" if category != CENTRED_OVERALL else ""
            )
            probe_cell = f"{probes[category][i]:.3f}" if category in probes else ""
            print(
                f"| {head} | {layer} | {score.layer_aqi[i]:.1f} [{score.layer_ci_low[i]:.1f}, "
                f"{score.layer_ci_high[i]:.1f}] | {score.layer_auc[i]:.3f} "
                f"| {score.layer_eta2[i]:.3f} | {other.layer_aqi[i]:.1f} | {baselines} "
                f"| {geometry_cell} | {probe_cell} |"
            )
    for category in (OVERALL, CENTRED_OVERALL):
        score = report[category]
        print(
            f"\n{category}, mean over the three layers: mahalanobis {score.aqi:.1f} "
            f"[{score.ci_low:.1f}, {score.ci_high:.1f}], sink-free {free[category].aqi:.1f}"
        )
    headline = mahals.aqi.evaluate(model, dataset).overall  # the library / Phase 1 defaults
    print(
        f"\nHeadline with the defaults (all {n_layers} layers, sink-free): AQI {headline.aqi:.1f} "
        f"[{headline.ci_low:.1f}, {headline.ci_high:.1f}], AUC {headline.auc:.3f}, length "
        f"baseline {headline.baselines['length']:.1f}, embedding baseline "
        f"{headline.baselines['embedding']:.1f}"
    )
    generator = torch.Generator().manual_seed(0)
    shuffled_scores = []
    for _ in range(shuffles):
        shuffled = list(labels)
        for axiom in report.axioms:
            rows = [i for i, a in enumerate(axioms) if a == axiom]
            permuted = torch.randperm(len(rows), generator=generator).tolist()
            for row, source in zip(rows, permuted, strict=True):
                shuffled[row] = labels[rows[source]]
        control = evaluate_activations(
            mean.tensor, axioms, shuffled, layer_ids=mean.layers, n_bootstrap=0
        )
        shuffled_scores += [v for a in control.axioms for v in control[a].layer_aqi]
    print(
        f"\nShuffled labels (within category, {shuffles} shuffles × {len(report.axioms)} "
        f"categories × {len(layers)} layers = {len(shuffled_scores)} cells): mean "
        f"{np.mean(shuffled_scores):.2f}, sd {np.std(shuffled_scores, ddof=1):.2f}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="registry key (default: both)")
    parser.add_argument("--xstest", type=Path, default=DEFAULT_XSTEST)
    parser.add_argument("--shuffles", type=int, default=5)
    args = parser.parse_args()
    for name in args.model or MODELS:
        table(name, args.xstest, args.shuffles)


if __name__ == "__main__":
    main()
