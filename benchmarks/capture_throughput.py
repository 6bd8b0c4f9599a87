"""Tokens/s of residual-stream capture against a plain forward pass and two peers.

Same model, same batches (``--batches`` of ``--batch`` x ``--seq`` random token ids, no padding):

* ``forward``          plain ``model(input_ids, attention_mask)`` with logits (the reference)
* ``forward_decoder``  the decoder stack alone (no LM head) — what capture must at least run
* ``mahals``           ``mahals.capture(pool="mean")`` of every layer, results on the host
* ``hf_hidden``        HF ``output_hidden_states=True`` + the same mean pooling on the device
* ``lens``             TransformerLens ``TransformerBridge.run_with_cache`` (resid_post filter) +
                       mean pooling (the bridge forces eager attention)

Usage:
    python benchmarks/capture_throughput.py --model smollm2 --batch 8 --seq 128       # CPU
    python benchmarks/capture_throughput.py --model llama8b-random --batch 16 --seq 256  # GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from shapes import report  # noqa: E402

from mahals.activations import capture
from mahals.models import load_model

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)


def build(name: str, device: torch.device, dtype: torch.dtype):
    if name == "smollm2":
        return load_model("SmolLM2-135M-Instruct", device=device, dtype=dtype, verbose=False), None
    if name == "llama8b-random":
        config = transformers.LlamaConfig(**LLAMA_8B)
        config_dir = tempfile.mkdtemp()
        config.save_pretrained(config_dir)
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        tokenizer = _stub_tokenizer(config.vocab_size)
        return load_model(hf, tokenizer=tokenizer, verbose=False), config_dir
    raise ValueError(name)


def _stub_tokenizer(vocab_size: int):
    """A tokenizer object with just what capture reads: the inputs are pre-tokenised ids."""
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    return tok


def mean_pool(states, mask):
    weights = (mask / mask.sum(-1, keepdim=True)).unsqueeze(1)
    return torch.stack([torch.bmm(weights, h.float()).squeeze(1) for h in states], 1).cpu()


def timed(fn, batches, device, repeats):
    fn(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "llama8b-random"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    parser.add_argument("--json", help="append the result row as JSON to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, config_dir = build(args.model, device, dtype)
    config_dir = config_dir or model.hf.config._name_or_path
    hf = model.hf
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(2, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
        for _ in range(args.batches)
    ]
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=device)

    def forward(ids):
        with torch.inference_mode():
            hf(input_ids=ids, attention_mask=mask)

    def forward_decoder(ids):
        with torch.inference_mode():
            hf.get_decoder()(input_ids=ids, attention_mask=mask)

    def mahals_capture(ids):
        capture(model, list(ids), pool="mean", batch_size=args.batch, progress=False)

    def hf_hidden(ids):
        with torch.inference_mode():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            mean_pool(out.hidden_states[1:], mask.float())

    methods = {"forward": forward, "forward_decoder": forward_decoder, "mahals": mahals_capture, "hf_hidden": hf_hidden}
    if "lens" not in args.skip:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(str(config_dir), hf_model=hf, tokenizer=model.tokenizer, device=device)

        def lens(ids):
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
                mean_pool([cache[f"blocks.{layer}.hook_resid_post"] for layer in range(model.n_layers)], mask.float())
                del cache

        methods["lens"] = lens
    tokens = args.batch * args.seq * args.batches
    results = {}
    for name, fn in methods.items():
        if name in args.skip:
            continue
        seconds = timed(fn, batches, device, args.repeats)
        results[name] = tokens / seconds
        gc.collect()
        print(f"{name:16s} {results[name]:12.0f} tok/s", flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    row = {
        "date": datetime.date.today().isoformat(), "card": card, "model": args.model, "dtype": str(dtype),
        "batch": args.batch, "seq": args.seq, "batches": args.batches, "tok_per_s": results,
        "mahals_vs_forward": results["mahals"] / results["forward"],
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    report(row, args.json)


if __name__ == "__main__":
    main()
