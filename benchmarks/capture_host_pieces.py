"""Host cost of the pieces of a streamed capture, on a model whose device work is negligible.

The Llama-3.1-8B layer stack made 64 wide (``tracing_overhead.llama_8b_shape(narrow=True)``:
its 32 layers, heads and code path, next to no GPU work), so each method's time is what it
costs the host. 40 batches of 4 x 128 random ids a round; rounds interleave the methods in
this order; each method's median over rounds of its time against the mean of the round's two
floors (``floor`` first, ``floor_again`` last: ``bracketed_ratio``, and the same as a difference
in ms a batch):

* ``floor`` / ``floor_again``  the decoder stack alone
* ``floor_warn``       the floor inside ``warnings.catch_warnings`` with a filter set (as a trace)
* ``floor_greenlet``   the floor, each batch's forward in a fresh greenlet
* ``envelope``         an nnsight trace of the whole model with an empty body, no module routed
* ``direct_hold``      the floor with mahals' held reads of all 32 layers and their pooling,
                       no trace (``tracing._holding`` and ``_read_held``)
* ``run_trace``        ``mahals.tracing.run_trace`` over batches padded beforehand, its pooled
                       reads left on the device
* ``stream``           ``mahals.capture`` over all the batches (padding, staging, landing)

Usage (GPU): python benchmarks/capture_host_pieces.py rows.jsonl [cuda] [ROUNDS]
"""

import json
import statistics
import sys
import warnings
from pathlib import Path

import greenlet
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import word_tokenizer  # noqa: E402
from tracing_overhead import bracketed_ratios, llama_8b_shape, random_batches, rounds  # noqa: E402

from mahals.activations import capture, pooling_reader  # noqa: E402
from mahals.models import load_model  # noqa: E402
from mahals.tracing import Batch, _handing_off_only, _holding, _read_held, run_trace  # noqa: E402

N_BATCHES = 40


def pieces(device: torch.device) -> dict:
    """The timed methods (see the module notes), each over the same batches."""
    hf = llama_8b_shape(device, narrow=True)
    model = load_model(hf, tokenizer=word_tokenizer(), verbose=False)
    dec = hf.get_decoder()
    batches = random_batches(4, 128, N_BATCHES, device, torch.Generator().manual_seed(0))
    padded = [Batch.pad(ids.tolist(), pad_id=0, side="right", device=device) for ids in batches]
    rows = [r for ids in batches for r in ids.tolist()]
    reader = pooling_reader("mean")
    layers = list(range(hf.config.num_hidden_layers))

    def floor():
        for ids in batches:
            with torch.inference_mode():
                dec(input_ids=ids, use_cache=False)

    def floor_warn():
        for ids in batches:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dec(input_ids=ids, use_cache=False)

    def floor_greenlet():
        for ids in batches:
            with torch.inference_mode():
                greenlet.greenlet(lambda: dec(input_ids=ids, use_cache=False)).switch()  # noqa: B023

    def envelope():
        for ids in batches:
            with torch.inference_mode(), _handing_off_only(model, []):  # noqa: SIM117
                # the trace in a with of its own: nnsight reads the body of the block it opens
                with model.nn.trace(input_ids=ids, use_cache=False):
                    pass

    def direct_hold():
        for batch in padded:
            outs = []
            with torch.inference_mode(), _holding(model, layers, outs, stop_after_last=False):
                dec(input_ids=batch.input_ids, use_cache=False)
                _read_held(reader, layers, outs, batch)

    def run_traces():
        for batch in padded:
            run_trace(model, batch, read_layers=layers, reader=reader, interventions=())

    def stream():
        capture(model, rows, pool="mean", batch_size=4, progress=False)

    return {
        "floor": floor,
        "floor_warn": floor_warn,
        "floor_greenlet": floor_greenlet,
        "envelope": envelope,
        "direct_hold": direct_hold,
        "run_trace": run_traces,
        "stream": stream,
        "floor_again": floor,
    }


def main() -> None:
    out = Path(sys.argv[1])
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 21
    seconds = rounds(pieces(device), repeats)
    ratios = bracketed_ratios(seconds, "floor", "floor_again")
    floors = [(a + b) / 2 for a, b in zip(seconds["floor"], seconds["floor_again"], strict=True)]
    results = {
        name: {
            "median_ms_per_batch": round(statistics.median(value) / N_BATCHES * 1e3, 3),
            "bracketed_extra_ms_per_batch": round(
                statistics.median(
                    (t - f) / N_BATCHES * 1e3 for t, f in zip(value, floors, strict=True)
                ),
                3,
            ),
            "bracketed_ratio": ratios[name],
        }
        for name, value in seconds.items()
    }
    for name, value in results.items():
        print(f"{name:15s} {value}")
    record = {
        "rounds": repeats,
        "results": results,
        "round_seconds": seconds,
        "python": sys.version,
    }
    out.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
