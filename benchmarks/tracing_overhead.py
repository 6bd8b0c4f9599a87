"""Capture through the tracing core against the decoder stack alone and against plain hooks.

Same model, same batches of random token ids (no padding), methods interleaved and each timed
as the best of ``--repeats``:

* ``decoder``        ``model.model(input_ids, attention_mask, use_cache=False)``: the floor
* ``hooks``          the decoder stack with torch forward hooks mean-pooling every layer on the
                     device, ``[batch, layers, d]`` copied to the host once per batch
* ``mahals``         ``mahals.capture(pool="mean")`` of every layer, one call per batch (so
                     every batch ends in a host synchronisation; default routing: nnsight
                     controllers on the layers only)
* ``mahals_stream``  one ``mahals.capture`` call over all the batches (as a pipeline calls it:
                     each batch's results land on the host while the next batch runs)
* ``mahals_all``     the same with ``instrument="all"`` (nnsight's default: every module routed)
* ``steered``        ``mahals.capture`` with a 5-layer steering vector applied at all positions

``--profile`` also writes cProfile's top functions of 20 small-batch captures (4 x 128).

Usage (GPU): python benchmarks/tracing_overhead.py --json rows.jsonl
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES, report, word_tokenizer  # noqa: E402

from mahals.activations import capture  # noqa: E402
from mahals.models import load_model  # noqa: E402

SHAPES_TO_TIME = [(16, 256, 8), (32, 512, 3), (64, 64, 12), (4, 128, 40)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, batches, repeats: int) -> float:
    fn(batches[0])
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def hooked_pooling(decoder, layers):
    """Plain torch forward hooks that mean-pool each layer's output on the device."""
    pooled: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        pooled.append(hidden.float().mean(1))

    handles = [layer.register_forward_hook(hook) for layer in layers]

    def run(ids):
        pooled.clear()
        with torch.inference_mode():
            decoder(input_ids=ids, use_cache=False)
            torch.stack(pooled, 1).cpu()

    return run, handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="write the small-batch cProfile table to this file")
    parser.add_argument("--steering", action="store_true", help="also time steered capture")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU (checks the script runs)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    config = SHAPES["llama"]()
    if args.smoke:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 6, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 4, 2, 256
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    hf.eval()
    tokenizer = word_tokenizer()
    # Re-wrapping re-installs nnsight's controllers on the shared modules, so each timing uses
    # the wrapper made last; closures look models up here.
    models = {"lean": load_model(hf, tokenizer=tokenizer, verbose=False)}
    decoder = hf.get_decoder()
    generator = torch.Generator().manual_seed(0)
    methods = {}

    def floor(ids):
        with torch.inference_mode():
            decoder(input_ids=ids, use_cache=False)

    methods["decoder"] = floor
    layers = models["lean"].adapter.decoder_layers(hf)
    hooks, handles = hooked_pooling(decoder, layers)
    for handle in handles:
        handle.remove()
    methods["hooks"] = hooks

    def mahals_capture(ids, which="lean"):
        capture(models[which], list(ids), pool="mean", batch_size=len(ids), progress=False)

    methods["mahals"] = mahals_capture
    methods["mahals_stream"] = "stream"
    if args.steering:
        from mahals.steering import Steering, SteeringVector, steer

        vector = SteeringVector(
            torch.randn(5, hf.config.hidden_size) * 0.1, layers=tuple(range(hf.config.num_hidden_layers - 5, hf.config.num_hidden_layers)), base_model="random",
            tuned_model="random", dataset="none", pool="last", n_samples=1,
        )

        def steered(ids):
            with steer(models["lean"], Steering(vector)):
                mahals_capture(ids)

        methods["steered"] = steered
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    for batch, seq, n in [(4, 16, 2)] if args.smoke else SHAPES_TO_TIME:
        batches = [torch.randint(10, 200, (batch, seq), generator=generator).to(device) for _ in range(n)]
        results = {}
        for name, fn in methods.items():
            if name == "hooks":
                fn, handles = hooked_pooling(decoder, layers)
            if name == "mahals_stream":
                every_text = [row for ids in batches for row in ids]

                def stream(_ids, every_text=every_text, batch=batch):
                    capture(models["lean"], every_text, pool="mean", batch_size=batch, progress=False)

                results[name] = batch * seq * n / timed(stream, [None], args.repeats)
                continue
            results[name] = batch * seq * n / timed(fn, batches, args.repeats)
            if name == "hooks":
                for handle in handles:
                    handle.remove()
        # instrument="all": re-wrap (installs every controller), time, then restore lean routing.
        models["all"] = load_model(hf, tokenizer=tokenizer, instrument="all", verbose=False)
        results["mahals_all"] = batch * seq * n / timed(
            lambda ids: mahals_capture(ids, "all"), batches, args.repeats
        )
        models["lean"] = load_model(hf, tokenizer=tokenizer, verbose=False)
        row = {
            "date": datetime.date.today().isoformat(), "card": card, "shape": "llama-3.1-8b" if not args.smoke else "tiny", "batch": batch,
            "seq": seq, "batches": n, "tok_per_s": {k: round(v) for k, v in results.items()},
            "ratio_to_decoder": {k: round(v / results["decoder"], 4) for k, v in results.items()},
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        report(row, args.json)
    if args.profile:
        ids = torch.randint(10, 200, (4, 16 if args.smoke else 128), generator=generator).to(device)
        sections = []
        for name, fn in (("decoder alone", floor), ("mahals.capture", mahals_capture)):
            profiler = cProfile.Profile()
            synchronize()
            profiler.enable()
            for _ in range(20):
                fn(ids)
            synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            sections.append(f"### {name}: 20 calls at 4 x 128\n{text.getvalue()}")
        Path(args.profile).write_text("\n".join(sections))

if __name__ == "__main__":
    main()
