"""Capture through the tracing core against the decoder stack alone and against plain hooks.

Same model, same batches of random token ids (no padding). Each method runs over all the
batches once per round; rounds repeat ``--repeats`` times with the methods interleaved (so a
noisy spell on the host hits every method alike), and each row gives each method's best round
(``ratio_to_decoder``), its median round (``median_ratio_to_decoder``) and the median over rounds
of its ratio to the floor within the same round (``paired_ratio_to_decoder``: a spell that slows
one round slows both sides of that round's ratio), and with ``--methods decoder X
decoder_again`` the median of its ratio to the mean of the two floors that bracket it
(``bracketed_ratio_to_decoder``); ``round_seconds`` keeps every round, ``round_starts`` when
each began (Unix seconds, to line rounds up with a clock log), and ``round_cpu_seconds`` /
``round_main_cpu_seconds`` the CPU time the process (all threads) / its main thread spent in
it (a device synchronisation's spin included), paired with the floor's as wall times are
(``paired_cpu_ratio_to_decoder``, ``paired_main_cpu_ratio_to_decoder``: the host work a method
adds, less sensitive than wall time to the process waiting for a core):

* ``decoder``        ``model.model(input_ids, attention_mask, use_cache=False)``: the floor
* ``decoder_again``  the floor again, as a method of its own (A/A: the host's spread)
* ``hooks``          the decoder stack with torch forward hooks mean-pooling every layer on the
                     device, ``[batch, layers, d]`` copied to the host once per batch
* ``mahals``         ``mahals.capture(pool="mean")`` of every layer, one call per batch (so
                     every batch ends in a host synchronisation)
* ``mahals_stream``  one ``mahals.capture`` call over all the batches (as a pipeline calls it:
                     each batch's results land on the host while the next batch runs)
* ``steered``        ``--steering``: ``mahals_stream`` with a 5-layer steering vector applied
                     at all positions
* ``stream_switch``  ``--decompose``: ``mahals_stream`` with ``tracing.HOLD_BYTES = 0``, so
                     every layer is read through its own switch into the trace body
* ``stream_traced``  ``--decompose``: ``mahals_stream`` with a writer that writes nothing at the
                     last layer, which puts that layer in a trace body: each batch runs
                     inside an nnsight trace (where pure held reads run untraced)
* ``trace_last``     ``--decompose``: a bare ``run_trace`` reading only the last layer (held:
                     untraced), one synchronisation per batch (the per-trace cost)
* ``trace_pool``     ``--decompose``: the streamed capture's main-thread work without its
                     host copies: pad, ``run_trace`` pooling every layer, no synchronisation
* ``trace_pool_stage`` the same, also staging each batch's copy to pinned host memory and
                     moving the rows into the result at the end (capture without its
                     tokenising, batch planning and progress bar)
* ``mahals_all``     per-call capture with ``instrument="all"`` (nnsight's default: every
                     module routed), timed after the others (it re-wraps the model)
* ``decoder_settrace`` ``--settrace``: the floor with ``sys.settrace`` switched on (a no-op
                     function) and off again before each batch, as nnsight does to skip the
                     body of a trace that has one (on Python >= 3.12 every function run after
                     the switch re-instruments itself once)

Texts reach ``mahals`` as token-id lists on the host (as after tokenisation).
``--profile`` also writes cProfile's top functions of 20 small-batch captures (4 x 128).

Usage (GPU): python benchmarks/tracing_overhead.py --steering --decompose --json rows.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import pstats
import statistics
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


def run_once(fn, cpu_seconds: list[tuple[float, float]] | None = None) -> float:
    """Wall seconds of ``fn()`` between two device synchronisations; appends the CPU seconds
    of the process (every thread) and of the calling thread over the same span to
    ``cpu_seconds`` when given."""
    synchronize()
    start, process, thread = time.perf_counter(), time.process_time(), time.thread_time()
    fn()
    synchronize()
    if cpu_seconds is not None:
        cpu_seconds.append((time.process_time() - process, time.thread_time() - thread))
    return time.perf_counter() - start


def rounds(
    methods: dict,
    repeats: int,
    cpu_seconds: dict[str, list[tuple[float, float]]] | None = None,
    starts: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each method's rounds; methods interleaved within every round. With
    ``cpu_seconds``, each round's CPU seconds are added there under the method's name; with
    ``starts``, the round's start (Unix seconds: to line rounds up with a clock log)."""
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            cpu = None if cpu_seconds is None else cpu_seconds.setdefault(name, [])
            if starts is not None:
                starts.setdefault(name, []).append(round(time.time(), 3))
            times[name].append(run_once(fn, cpu))
    return times


def paired_ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Each method's median over rounds of the floor's seconds over its own in that round."""
    floor = seconds["decoder"]
    return {
        name: round(statistics.median(f / t for f, t in zip(floor, value, strict=True)), 4)
        for name, value in seconds.items()
    }


def bracketed_ratios(
    seconds: dict[str, list[float]], first: str = "decoder", last: str = "decoder_again"
) -> dict[str, float] | None:
    """With the floor timed twice (``first``, ``last``): each method's median over rounds of
    the mean of the floor's two timings in that round over its own. With ``--methods decoder X
    decoder_again`` the two floors bracket X, so a host that speeds up or slows down
    steadily across a round slows X as much as their mean."""
    if last not in seconds:
        return None
    floors = [(a + b) / 2 for a, b in zip(seconds[first], seconds[last], strict=True)]
    return {
        name: round(statistics.median(f / t for f, t in zip(floors, value, strict=True)), 4)
        for name, value in seconds.items()
    }


def hooked_pooling(decoder, layers):
    """Plain torch forward hooks that mean-pool each layer's output on the device; the hooks
    are live only while the returned function runs."""
    pooled: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        pooled.append(hidden.float().mean(1))

    def run(batches):
        handles = [layer.register_forward_hook(hook) for layer in layers]
        try:
            for ids in batches:
                pooled.clear()
                with torch.inference_mode():
                    decoder(input_ids=ids, use_cache=False)
                    torch.stack(pooled, 1).cpu()
        finally:
            for handle in handles:
                handle.remove()

    return run


def random_batches(
    batch: int, seq: int, n: int, device: torch.device, generator: torch.Generator
) -> list[torch.Tensor]:
    """``n`` batches of random token ids ``[batch, seq]`` on ``device`` (no padding)."""
    return [torch.randint(10, 200, (batch, seq), generator=generator).to(device) for _ in range(n)]


def llama_8b_shape(device: torch.device, smoke: bool = False, narrow: bool = False):
    """The Llama-3.1-8B shape with random bf16 weights and sdpa on ``device``, in eval mode
    (``smoke``: 6 tiny layers; ``narrow``: its 32 layers, each 64 wide — the same host work
    per forward with next to none on the device)."""
    config = SHAPES["llama"]()
    if smoke or narrow:
        config.hidden_size, config.intermediate_size = 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 4, 2, 256
    if smoke:
        config.num_hidden_layers = 6
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", help="only these batch x seq shapes, e.g. 4x128")
    parser.add_argument("--json")
    parser.add_argument("--profile", help="write the small-batch cProfile table to this file")
    parser.add_argument("--steering", action="store_true", help="also time steered capture")
    parser.add_argument(
        "--decompose", action="store_true", help="also time bare traces (see above)"
    )
    parser.add_argument(
        "--settrace", action="store_true", help="also time the floor after sys.settrace switches"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer model on the CPU (checks the script runs)"
    )
    parser.add_argument(
        "--narrow",
        action="store_true",
        help="32 layers 64 wide on the GPU: what each method costs the host alone",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="time only these methods, in this order each round (with decoder; see bracketed)",
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    hf = llama_8b_shape(device, smoke=args.smoke, narrow=args.narrow)
    tokenizer = word_tokenizer()
    model = load_model(hf, tokenizer=tokenizer, verbose=False)
    decoder = hf.get_decoder()
    layers = model.adapter.decoder_layers(hf)
    generator = torch.Generator().manual_seed(0)
    vector = None
    if args.steering:
        from mahals.steering import SteeringVector

        n_layers = hf.config.num_hidden_layers
        vector = SteeringVector(
            torch.randn(5, hf.config.hidden_size) * 0.1,
            layers=tuple(range(n_layers - 5, n_layers)),
            base_model="random",
            tuned_model="random",
            dataset="none",
            pool="last",
            n_samples=1,
        )
    shape_name = "tiny" if args.smoke else "llama-3.1-8b" + ("-narrow" if args.narrow else "")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    shapes = [(4, 16, 2)] if args.smoke else SHAPES_TO_TIME
    if args.shapes:
        shapes = [shape for shape in shapes if f"{shape[0]}x{shape[1]}" in args.shapes]
    for batch, seq, n in shapes:
        batches = random_batches(batch, seq, n, device, generator)
        methods = shape_methods(model, decoder, layers, batches, vector, args.decompose, device)
        if args.settrace:
            methods["decoder_settrace"] = settrace_floor(decoder, batches)
        if args.methods:
            unknown = set(args.methods) - set(methods) - {"mahals_all"}
            if unknown:
                parser.error(f"--methods: unknown {sorted(unknown)}; known: {sorted(methods)}")
            if "decoder" not in args.methods:
                parser.error("--methods needs decoder: every ratio is to the floor")
            methods = {name: methods[name] for name in args.methods if name != "mahals_all"}
        cpu: dict[str, list[tuple[float, float]]] = {}
        starts: dict[str, list[float]] = {}
        times = rounds(methods, args.repeats, cpu, starts)
        process = {name: [round(p, 5) for p, _ in value] for name, value in cpu.items()}
        main_thread = {name: [round(t, 5) for _, t in value] for name, value in cpu.items()}
        # mahals_all is timed in rounds of its own, after these: not paired with the floor
        paired = paired_ratios(times)
        if not args.methods or "mahals_all" in args.methods:
            # instrument="all" re-installs nnsight's controllers on the shared modules: time it
            # last, then wrap the model again with the default routing for the next shape.
            every_module = load_model(hf, tokenizer=tokenizer, instrument="all", verbose=False)
            times |= rounds({"mahals_all": per_call_capture(every_module, batches)}, args.repeats)
            model = load_model(hf, tokenizer=tokenizer, verbose=False)
        results = {name: batch * seq * n / min(value) for name, value in times.items()}
        medians = {
            name: batch * seq * n / statistics.median(value) for name, value in times.items()
        }
        row = {
            "date": datetime.date.today().isoformat(),
            "card": card,
            "shape": shape_name,
            "batch": batch,
            "seq": seq,
            "batches": n,
            "repeats": args.repeats,
            "tok_per_s": {k: round(v) for k, v in results.items()},
            "ratio_to_decoder": {k: round(v / results["decoder"], 4) for k, v in results.items()},
            "median_ratio_to_decoder": {
                k: round(v / medians["decoder"], 4) for k, v in medians.items()
            },
            "paired_ratio_to_decoder": paired,
            "bracketed_ratio_to_decoder": bracketed_ratios(times),
            "paired_cpu_ratio_to_decoder": paired_ratios(process),
            "paired_main_cpu_ratio_to_decoder": paired_ratios(main_thread),
            "round_seconds": {k: [round(t, 5) for t in v] for k, v in times.items()},
            "round_starts": starts,
            "round_cpu_seconds": process,
            "round_main_cpu_seconds": main_thread,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        report(row, args.json)
    if args.profile:
        ids = torch.randint(10, 200, (4, 16 if args.smoke else 128), generator=generator).to(device)
        sections = []
        stream_rows = [row for _ in range(10) for row in ids.tolist()]
        for name, fn in (
            ("decoder alone", lambda: floor_forward(decoder, ids)),
            ("mahals.capture", lambda: capture(model, ids.tolist(), pool="mean", batch_size=4, progress=False)),
            ("mahals.capture streamed, 10 batches per call",
             lambda: capture(model, stream_rows, pool="mean", batch_size=4, progress=False)),
        ):  # fmt: skip
            profiler = cProfile.Profile()
            synchronize()
            profiler.enable()
            for _ in range(20):
                fn()
            synchronize()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            sections.append(f"### {name}: 20 calls at 4 x 128\n{text.getvalue()}")
        Path(args.profile).write_text("\n".join(sections))


def floor_forward(decoder, ids) -> None:
    with torch.inference_mode():
        decoder(input_ids=ids, use_cache=False)


def settrace_floor(decoder, batches):
    """The floor over ``batches``, switching ``sys.settrace`` on and off before each batch,
    as nnsight's skip hook does once per trace whose body has code."""

    def run():
        for ids in batches:
            sys.settrace(lambda *_args: None)
            sys.settrace(None)
            floor_forward(decoder, ids)

    return run


def per_call_capture(model, batches):
    """One ``capture`` call per batch (each ends in a host synchronisation)."""
    host_batches = [ids.tolist() for ids in batches]

    def run():
        for ids in host_batches:
            capture(model, ids, pool="mean", batch_size=len(ids), progress=False)

    return run


def shape_methods(model, decoder, layers, batches, vector, decompose: bool, device) -> dict:
    """The timed methods of one shape, each a no-argument callable over all the batches."""
    from mahals import tracing
    from mahals.steering import Steering, steer

    host_batches = [ids.tolist() for ids in batches]
    every_text = [row for ids in host_batches for row in ids]
    size = len(host_batches[0])
    hooks = hooked_pooling(decoder, layers)

    def stream():
        capture(model, every_text, pool="mean", batch_size=size, progress=False)

    methods = {
        "decoder": lambda: [floor_forward(decoder, ids) for ids in batches],
        # the floor timed again as a method of its own: how far apart two timings of one
        # method land on this host (an A/A comparison)
        "decoder_again": lambda: [floor_forward(decoder, ids) for ids in batches],
        "hooks": lambda: hooks(batches),
        "mahals": per_call_capture(model, batches),
        "mahals_stream": stream,
    }
    if vector is not None:

        def steered():
            with steer(model, Steering(vector)):
                stream()

        methods["steered"] = steered
    if decompose:

        def stream_switch():
            saved, tracing.HOLD_BYTES = tracing.HOLD_BYTES, 0
            try:
                stream()
            finally:
                tracing.HOLD_BYTES = saved

        last_layer = len(layers) - 1

        class WritesNothing:
            layers = (last_layer,)

            def __call__(self, layer, hidden, batch):
                return None

            def fingerprint(self) -> str:
                return "writes-nothing"

        def stream_traced():
            capture(
                model, every_text, pool="mean", batch_size=size, progress=False,
                interventions=[WritesNothing()],
            )  # fmt: skip

        def trace_last():
            for ids in host_batches:
                batch = tracing.Batch.pad(ids, pad_id=0, device=device)
                tracing.run_trace(
                    model,
                    batch,
                    read_layers=[len(layers) - 1],
                    reader=lambda _l, h, _b: h,
                    interventions=(),
                )
                synchronize()

        from mahals.activations import _stack_on, _Staging, pooling_reader

        every_layer = list(range(len(layers)))

        def trace_pool(stage: bool):
            # the streamed capture's main-thread work, cut short: pad, trace, pool every layer
            # (and stage each batch's copy to the host, landing as capture lands it)
            def run():
                reader = pooling_reader("mean")
                rows = [list(range(i * size, (i + 1) * size)) for i in range(len(host_batches))]
                out = torch.empty((len(every_text), len(layers), model.d_model))
                staging = _Staging(out, rows, device, model, every_layer) if stage else None
                with staging or contextlib.nullcontext():
                    for ids, batch_rows in zip(host_batches, rows, strict=True):
                        batch = tracing.Batch.pad(ids, pad_id=0, device=device)
                        reads, _ = tracing.run_trace(
                            model, batch, read_layers=every_layer, reader=reader, interventions=()
                        )
                        if staging is not None:
                            staging.add(batch_rows, _stack_on(reads, device))
                    if staging is not None:
                        staging.finish()
                synchronize()

            return run

        methods["stream_switch"] = stream_switch
        methods["stream_traced"] = stream_traced
        methods["trace_last"] = trace_last
        methods["trace_pool"] = trace_pool(stage=False)
        methods["trace_pool_stage"] = trace_pool(stage=True)
    return methods


if __name__ == "__main__":
    main()
