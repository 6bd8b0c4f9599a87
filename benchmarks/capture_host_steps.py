"""Host time of each per-batch step of a streamed capture, each timed alone (no forward pass).

On a CUDA device, with the shapes of a 4 x 128 batch of the Llama-3.1-8B shape (32 layers,
d_model 4096, bf16): each step runs ``number`` times in a loop, best of ``repeat`` loops, in
microseconds a call. The GPU work the steps queue is waited for outside the timed loops
(every ``number`` calls), so the times are the host's. What each step is:

* ``pad``             ``Batch.pad`` of 4 token-id lists of 128 (numpy, pinned buffer, one copy)
* ``prepare``         the mean-pooling reader's per-batch mask and counts
* ``read_many``       the reader pooling 32 held layers ``[4, 128, 4096]`` at once
* ``stack_on``        ``_stack_on`` of the reads ``read_many`` returned (held layers: it takes
                      their stacked tensor as it is)
* ``stack_reads``     ``_stack_on`` of 32 separate ``[4, 4096]`` reads (a plain list: stacked)
* ``stage``           ``_Staging.add`` of one pooled ``[4, 32, 4096]`` block
* ``result_free``     allocating a ``[160, 32, 4096]`` float32 result (a capture of 40 such
                      batches) with ``torch.empty``, writing all of it once and freeing it
* ``result_free_huge`` the same with ``mahals.activations.host_result`` (huge pages), as
                      ``capture`` allocates its result
* ``hold_layers``     entering and leaving ``_holding`` for 32 layers (per trace)
* ``held_layers``     ``_held_layers`` deciding which layers to hold (per trace)

Usage (GPU): python benchmarks/capture_host_steps.py rows.jsonl
"""

import datetime
import json
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import word_tokenizer  # noqa: E402
from tracing_overhead import llama_8b_shape  # noqa: E402

from mahals.activations import _stack_on, _Staging, host_result, pooling_reader  # noqa: E402
from mahals.models import load_model  # noqa: E402
from mahals.tracing import Batch, _held_layers, _holding  # noqa: E402

BATCH, SEQ, LAYERS, D_MODEL, N_BATCHES = 4, 128, 32, 4096, 40


def best_us(fn, number: int, repeat: int = 7) -> float:
    def loop():
        for _ in range(number):
            fn()
        torch.cuda.synchronize()

    loop()
    return round(min(timeit.repeat(loop, number=1, repeat=repeat)) / number * 1e6, 2)


def main() -> None:
    device = torch.device("cuda")
    model = load_model(llama_8b_shape(device, narrow=True), tokenizer=word_tokenizer(), verbose=False)
    rows = torch.randint(10, 200, (BATCH, SEQ)).tolist()
    device = model.device  # with its index, as capture passes it (cuda:0, not cuda)
    batch = Batch.pad(rows, pad_id=0, device=device)
    hiddens = [torch.randn(BATCH, SEQ, D_MODEL, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
    layers = list(range(LAYERS))
    reader = pooling_reader("mean")
    pooled = reader.read_many(layers, hiddens, batch)
    block = _stack_on(pooled, device)
    out = torch.empty((BATCH * N_BATCHES, LAYERS, D_MODEL))
    plan = [list(range(i * BATCH, (i + 1) * BATCH)) for i in range(N_BATCHES)]

    def prepare():
        reader._batch = None
        reader._prepare(hiddens[0], batch)

    def result_free(allocate):
        def run():
            result = allocate((BATCH * N_BATCHES, LAYERS, D_MODEL))
            result.numpy()[:] = 1
            del result

        return run

    def hold():
        with _holding(model, layers, [], stop_after_last=True):
            pass

    staging = _Staging(out, plan * 250, device, model, layers)  # room for every timed add
    adds = iter(range(10**9))

    def stage_one():
        staging.add(plan[next(adds) % N_BATCHES], block)
        if staging.used + BATCH > len(staging.buffer):
            staging.used = 0  # the buffer from its start again (what landed is not checked)
            staging.segment = []

    results = {
        "pad": best_us(lambda: Batch.pad(rows, pad_id=0, device=device), 1000),
        "prepare": best_us(prepare, 1000),
        "read_many": best_us(lambda: reader.read_many(layers, hiddens, batch), 300),
        "stack_on": best_us(lambda: _stack_on(pooled, device), 1000),
        "stack_reads": best_us(lambda: _stack_on(list(pooled), device), 1000),
        "stage": best_us(stage_one, 1000),
        "result_free": best_us(result_free(torch.empty), 20),
        "result_free_huge": best_us(result_free(host_result), 20),
        "hold_layers": best_us(hold, 1000),
        "held_layers": best_us(lambda: _held_layers(model, batch, layers, {}, reader), 1000),
    }
    for name, value in results.items():
        print(f"{name:16s} {value:10.2f} us")
    row = {
        "date": datetime.date.today().isoformat(),
        "card": torch.cuda.get_device_name(),
        "us_per_call": results,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    with open(sys.argv[1], "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
