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
import time
import warnings
from pathlib import Path

import greenlet
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import word_tokenizer  # noqa: E402
from tracing_overhead import llama_8b_shape, random_batches, synchronize  # noqa: E402

from mahals.activations import capture, pooling_reader  # noqa: E402
from mahals.models import load_model  # noqa: E402
from mahals.tracing import Batch, _handing_off_only, _holding, _read_held, run_trace  # noqa: E402

dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
hf = llama_8b_shape(dev, narrow=True)
model = load_model(hf, tokenizer=word_tokenizer(), verbose=False)
dec = hf.get_decoder()
batches = random_batches(4, 128, 40, dev, torch.Generator().manual_seed(0))
padded = [Batch.pad(ids.tolist(), pad_id=0, side="right", device=dev) for ids in batches]
rows = [r for ids in batches for r in ids.tolist()]
reader = pooling_reader("mean")
L = list(range(32))


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
    for b in padded:
        outs = []
        with torch.inference_mode(), _holding(model, L, outs, stop_after_last=False):
            dec(input_ids=b.input_ids, use_cache=False)
            _read_held(reader, L, outs, b)


def run_traces():
    for b in padded:
        run_trace(model, b, read_layers=L, reader=reader, interventions=())


def stream():
    capture(model, rows, pool="mean", batch_size=4, progress=False)


methods = dict(
    floor=floor,
    floor_warn=floor_warn,
    floor_greenlet=floor_greenlet,
    envelope=envelope,
    direct_hold=direct_hold,
    run_trace=run_traces,
    stream=stream,
    floor_again=floor,
)
for f in methods.values():
    f()
R = int(sys.argv[3]) if len(sys.argv) > 3 else 21
t = {k: [] for k in methods}
for _ in range(R):
    for k, f in methods.items():
        synchronize()
        s = time.perf_counter()
        f()
        synchronize()
        t[k].append(time.perf_counter() - s)
fl = [(a + b) / 2 for a, b in zip(t["floor"], t["floor_again"], strict=True)]
res = {
    k: {
        "median_ms_per_batch": round(statistics.median(v) / 40 * 1e3, 3),
        "bracketed_extra_ms_per_batch": round(
            statistics.median((x - f) / 40 * 1e3 for x, f in zip(v, fl, strict=True)), 3
        ),
        "bracketed_ratio": round(statistics.median(f / x for x, f in zip(v, fl, strict=True)), 4),
    }
    for k, v in t.items()
}
for k, v in res.items():
    print(f"{k:15s} {v}")
record = {"rounds": R, "results": res, "round_seconds": t, "python": sys.version}
Path(sys.argv[1]).write_text(json.dumps(record) + "\n")
