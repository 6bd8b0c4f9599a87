"""Scale-out measurements on a machine with two (or more) GPUs; ``--smoke`` runs tiny shapes on
the CPU to check the script itself.

Three experiments (``--only`` picks some):

* ``split``   one random-weight model (Llama-3.1-8B shape, bf16) on GPU 0, then the same weights
              (same seed) dispatched with ``device_map="auto"`` over two GPUs: pooled capture
              (mean, last), steered capture, greedy steered generation and answer log-probs
              must agree to bf16 rounding. Prints the largest relative differences.
* ``fanout``  Phase 1 sanity for the study's six 7–9B shapes (random weights): the sequential
              run on one GPU, then through Ray on ``--gpus`` GPUs (one long-lived worker per
              GPU; each model's categories spread over them). Start-up and weight creation are
              timed apart and reported with the walls.
* ``big``     a Llama-3.1-70B-shape model (real config, random bf16), created on the meta
              device and materialised directly on the GPUs of its device map (never on the
              CPU): capture of all 80 layers, tokens/s and the ratio to a decoder-only forward
              with the same device map; then one steered greedy generation.

Usage (GPU machine; ray and nnsight as wheels, see the report):
    python benchmarks/scale.py --json benchmarks/results/scale.jsonl
    python benchmarks/scale.py --only big --batch 8 --seq 256
    python benchmarks/scale.py --smoke          # CPU, tiny shapes, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import shapes  # noqa: E402
from shapes import RandomLoader, random_sentence, report, word_tokenizer  # noqa: E402

from mahals.activations import capture  # noqa: E402
from mahals.arch import attn_implementation_for  # noqa: E402
from mahals.evaluation import answer_log_probs, scored_texts  # noqa: E402
from mahals.models import load_model  # noqa: E402
from mahals.pipelines.phase1 import Phase1Config, run_phase1  # noqa: E402
from mahals.registry import ModelSpec, Registry  # noqa: E402
from mahals.steering import Steering, SteeringVector, steer  # noqa: E402
from mahals.workers import start_warm_workers, stop_warm_workers  # noqa: E402

LLAMA_70B = dict(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    rope_scaling={
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)  # fmt: skip  (meta-llama/Llama-3.1-70B config.json)
#: The study's six 7–9B tuned models as (key suffix, architecture): Zephyr has Mistral's shape.
FANOUT_SHAPES = (("llama", "llama"), ("mistral", "mistral"), ("qwen2", "qwen2"),
                 ("gemma2", "gemma2"), ("falcon", "falcon"), ("zephyr", "mistral"))  # fmt: skip
AXIOMS = ("Civility & Tolerance", "Wisdom & Knowledge", "Well-being & Peace", "Justice & Rights")


def tiny(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """``config`` at smoke size: 4 layers, width 64, small vocabulary (shape only)."""
    values = config.to_dict()
    values.pop("layer_types", None)
    values.update(num_hidden_layers=4, hidden_size=64, intermediate_size=128, vocab_size=256,
                  num_attention_heads=4)  # fmt: skip
    for key, value in (("head_dim", 16), ("num_key_value_heads", 2)):
        if key in values:  # Falcon derives its head size and has no key-value head count
            values[key] = value
    return type(config).from_dict(values)


def random_model(config, device, dtype, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=attn_implementation_for(config.model_type, "sdpa"),
        ).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|`` in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def prompts(rng: random.Random, n: int) -> list[str]:
    return [random_sentence(rng, rng.randint(8, 60)) for _ in range(n)]


# ------------------------------------------------------------------------------ experiment a


def split_equals_single(args, device_map, dtype) -> dict:
    """Same weights on one device vs split by ``device_map``: capture, steering, generation."""
    config = shapes.SHAPES["llama"]()
    config = tiny(config) if args.smoke else config
    tokenizer = word_tokenizer()
    texts = prompts(random.Random(0), args.texts)
    answers = [random_sentence(random.Random(i), 12) for i in range(len(texts))]
    vector = SteeringVector(torch.randn(config.num_hidden_layers, config.hidden_size,
                                        generator=torch.Generator().manual_seed(1)),
                            layers=tuple(range(config.num_hidden_layers)))  # fmt: skip
    steering = Steering(vector, alpha=0.05, layers=tuple(range(config.num_hidden_layers // 2)))

    def measure(model) -> dict:
        out = {
            "mean": capture(model, texts, pool="mean", sinks="first", progress=False).tensor,
            "last": capture(model, texts, pool="last", progress=False).tensor,
            "logp": answer_log_probs(model, scored_texts(model, texts, answers), batch_size=8),
        }
        with steer(model, steering):
            out["steered_last"] = capture(model, texts, pool="last", progress=False).tensor
            out["steered_tokens"] = model.generate(texts[:4], max_new_tokens=16).token_ids
        return out

    single_device = "cpu" if args.smoke else "cuda:0"
    hf = random_model(config, single_device, dtype, seed=0)
    single = load_model(hf, tokenizer=tokenizer, verbose=False)
    reference = measure(single)
    single.free()
    hf = random_model(config, single_device, dtype, seed=0)  # the same weights again
    split = load_model(hf, tokenizer=tokenizer, device_map=device_map, verbose=False)
    devices = sorted({str(d) for d in split.hf.hf_device_map.values()})
    measured = measure(split)
    row = {
        "experiment": "split", "shape": "tiny-llama" if args.smoke else "Llama-3.1-8B",
        "dtype": str(dtype), "texts": len(texts), "devices": devices,
        "relative_error": {key: relative_error(measured[key], reference[key])
                           for key in ("mean", "last", "logp", "steered_last")},
        "steered_generation_equal": measured["steered_tokens"] == reference["steered_tokens"],
    }  # fmt: skip
    split.free()
    return row


# ------------------------------------------------------------------------------ experiment b


class TimedLoader(RandomLoader):
    """:class:`RandomLoader` that also writes each weight creation's seconds to a file, so a
    Ray task's timing reaches the driver."""

    def __init__(self, device: str, timings: Path, smoke: bool) -> None:
        super().__init__(device)
        self.timings = timings
        self.smoke = smoke

    def __call__(self, spec: ModelSpec):
        started, wall = time.perf_counter(), time.time()
        if self.smoke:  # the CPU path of RandomLoader: tiny shapes, float32, no CUDA calls
            hf = random_model(tiny(shapes.SHAPES[spec.architecture]()), "cpu", torch.float32, 0)
            model = load_model(hf, tokenizer=self.tokenizer, verbose=False)
            model.name, model.spec = spec.key, spec
        else:
            model = super().__call__(spec)
        seconds = time.perf_counter() - started
        self.timings.mkdir(parents=True, exist_ok=True)
        record = {"key": spec.key, "pid": os.getpid(), "started": wall, "seconds": seconds,
                  "process_started": process_started(), "torch_threads": torch.get_num_threads(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "cpus_allowed": len(os.sched_getaffinity(0))}  # fmt: skip
        (self.timings / f"{spec.key}.{os.getpid()}.{wall:.6f}.json").write_text(json.dumps(record))
        return model


def process_started() -> float:
    """Wall-clock time this process started (Linux: /proc, to the kernel's 10 ms tick)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def ray_cli(*arguments: str) -> None:
    """Run Ray's command line (``ray start``, ``ray stop``) with this interpreter."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *arguments], check=True)


def _fanout_registry(smoke: bool) -> tuple[Registry, tuple[str, ...]]:
    models = {}
    for name, architecture in FANOUT_SHAPES:
        config = shapes.SHAPES[architecture]()
        config = tiny(config) if smoke else config
        key = f"random-{name}"
        models[key] = ModelSpec(key, f"random/{key}", architecture, config.num_hidden_layers,
                                config.hidden_size, batch_size=16)  # fmt: skip
    return Registry(models=models), tuple(models)


def _write_prompts(path: Path, per_cell: int) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "axiom", "safety_label"])
        for axiom in AXIOMS:
            for label in ("safe", "unsafe"):
                for text in prompts(rng, per_cell):
                    writer.writerow([text, axiom, label])
    return path


def _phase1(args, keys, data: Path, out: Path, timings: Path, **options):
    registry, _ = _fanout_registry(args.smoke)
    config = Phase1Config(models=tuple(keys), mode=None, per_cell=args.per_cell, dataset=str(data),
                          n_bootstrap=50, out_dir=out, checkpoint="fresh", **options)  # fmt: skip
    loader = TimedLoader("cpu" if args.smoke else "cuda", timings, args.smoke)
    with contextlib.redirect_stdout(io.StringIO()):
        return run_phase1(config, loader=loader, registry=registry)


def _process_part(rank: int, args, keys, data: Path, work: Path, timings: Path, parts: int) -> None:
    """One process per GPU (the engine without Ray): its share of the models, its own folder."""
    if not args.smoke:
        torch.cuda.set_device(rank)
    _phase1(args, keys[rank::parts], data, work / f"part_{rank}", timings)


def fanout(args, gpus: int) -> dict:
    """Phase 1 sanity on the six shapes: sequential on one GPU, then over ``gpus`` GPUs through
    Ray (``--engine ray``: one worker per GPU, each model's categories split over them) or one
    process per GPU with whole models (``processes``).

    Start-up is timed apart: from the run's start to its first weight creation (Ray: starting
    Ray and the workers, which import torch and initialise CUDA; sequential: loading the data),
    as is weight creation (each load's seconds; under Ray the busiest worker's sum)."""
    _, keys = _fanout_registry(args.smoke)
    work = Path(tempfile.mkdtemp(prefix="mahals_scale_"))
    data = _write_prompts(work / "prompts.csv", args.per_cell)
    parallel = gpus or 2  # one worker per GPU (two on the CPU)
    row = {"experiment": "fanout", "engine": args.engine, "models": list(keys),
           "prompts_per_model": 8 * args.per_cell, "gpus": gpus}  # fmt: skip
    engines = (
        [f"ray_{start}" for start in args.ray_start] if args.engine == "ray" else ["processes"]
    )
    for mode in ("sequential", *engines):
        warm_up = None
        on_cluster = mode in ("ray_cluster", "ray_warm")
        if on_cluster:  # started before the run's clock, as a cluster would be
            warm_up = time.perf_counter()
            ray_cli("start", "--head", f"--num-gpus={gpus}", f"--num-cpus={os.cpu_count()}",
                    "--include-dashboard=false", "--disable-usage-stats")  # fmt: skip
            if mode == "ray_warm":  # `mahals workers up`: the pipelines imported, CUDA ready
                start_warm_workers("auto", workers=parallel)
            warm_up = time.perf_counter() - warm_up
        timings = work / f"timings_{mode}"
        started_wall = time.time()
        started = time.perf_counter()
        ray_ready = None
        if mode == "sequential":
            _phase1(args, keys, data, work / mode, timings)
            finished = time.perf_counter()
            folders = {key: work / mode for key in keys}
        elif mode.startswith("ray"):
            import ray

            ray.cloudpickle.register_pickle_by_value(shapes)  # the loader's module, to the workers
            if on_cluster:
                ray.init(address="auto")
            else:  # a Ray of the run's own, as mahals starts one; all CPUs: each worker
                # reserves its GPU's share (16 threads on a 64-CPU, 4-GPU node)
                no_prestart = {
                    "enable_worker_prestart": False,
                    "prestart_worker_first_driver": False,
                }
                ray.init(address="local", num_gpus=gpus, num_cpus=os.cpu_count(), include_dashboard=False,
                         _system_config=no_prestart if mode == "ray_no_prestart" else None)  # fmt: skip
            ray_ready = time.time() - started_wall
            try:
                # the address: the Ray this process is connected to, also for a single worker
                _phase1(args, keys, data, work / mode, timings, workers=parallel, ray_address="auto")
                finished = time.perf_counter()  # the run's end: tearing Ray down is not the run's
            finally:
                if mode == "ray_warm":
                    stop_warm_workers("auto")
                ray.shutdown()
                if on_cluster:
                    ray_cli("stop")
            folders = {key: work / mode for key in keys}
        else:
            spawn_args = (args, keys, data, work / mode, timings, parallel)
            torch.multiprocessing.spawn(_process_part, args=spawn_args, nprocs=parallel)
            finished = time.perf_counter()
            folders = {key: work / mode / f"part_{i % parallel}" for i, key in enumerate(keys)}
        wall = finished - started
        teardown = time.perf_counter() - finished
        loads = [json.loads(p.read_text()) for p in timings.glob("*.json")]
        per_process: dict[int, float] = {}
        for load in loads:
            per_process[load["pid"]] = per_process.get(load["pid"], 0.0) + load["seconds"]
        startup = min(load["started"] for load in loads) - started_wall
        creation = max(per_process.values())  # on the critical path: the busiest process's
        results = {key: _checkpointed(folders[key], key) for key in keys}
        first_load = {}  # each worker process: its start and its first weight creation
        for load in sorted(loads, key=lambda load: load["started"]):
            first_load.setdefault(load["pid"], load)
        row[mode] = {
            "wall_seconds": round(wall, 2),
            "startup_seconds": round(startup, 2),
            "ray_init_seconds": None if ray_ready is None else round(ray_ready, 2),
            "before_the_clock_seconds": None if warm_up is None else round(warm_up, 2),
            "teardown_after_the_clock_seconds": round(teardown, 2),
            "worker_process_started_seconds": sorted(
                round(load["process_started"] - started_wall, 2) for load in first_load.values()
            ) if ray_ready is not None else None,
            "worker_first_weights_seconds": sorted(
                round(load["started"] - started_wall, 2) for load in first_load.values()
            ),  # fmt: skip
            "weight_creations": len(loads),
            "weight_creation_seconds_busiest_process": round(creation, 2),
            "wall_excluding_startup_and_weights": round(wall - startup - creation, 2),
            "aqi": {key: round(results[key]["AQI"], 4) for key in keys},
            "model_seconds": {key: results[key].get("seconds") for key in keys},
            "loading_processes": sorted({(load["torch_threads"], load["omp_num_threads"],
                                          load["cpus_allowed"]) for load in loads}),
        }  # fmt: skip
    for engine in engines:
        row[engine]["same_aqi"] = row["sequential"]["aqi"] == row[engine]["aqi"]
        for name, field in (("speedup_wall", "wall_seconds"),
                            ("speedup_excluding_startup_and_weights", "wall_excluding_startup_and_weights")):  # fmt: skip
            row[engine][name] = round(row["sequential"][field] / row[engine][field], 2)
    return row


def _checkpointed(out: Path, key: str) -> dict:
    return json.loads((out / "phase1_aqi_checkpoint.json").read_text())["results"][key]["result"]


# ------------------------------------------------------------------------------ experiment c


def materialise(config, device_map: dict, dtype) -> transformers.PreTrainedModel:
    """A random model built on the meta device, each part created directly on its mapped
    device (weights ~ N(0, 0.02), norms 1), rotary tables rebuilt there: no copy on the CPU."""
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    for name, device in device_map.items():
        part = hf.get_submodule(name) if name else hf
        part.to_empty(device=device)
    torch.manual_seed(0)  # seeds every device
    with torch.no_grad():
        for parameter in hf.parameters():
            if parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    main_device = next(iter(device_map.values()))
    for name, module in list(hf.named_modules()):
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            device = module.inv_freq.device
            device = main_device if device.type == "meta" else device  # a part with no weights
            # a few frequencies, not weights: built on the CPU and moved
            setattr(hf.get_submodule(parent), child, type(module)(config=hf.config).to(device))
    return hf.eval()


def big_model(args, dtype) -> dict:
    """70B shape over the visible GPUs: capture vs decoder-only forward, then a steered generation."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    config = transformers.LlamaConfig(**LLAMA_70B)
    if args.smoke:
        config = tiny(config)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = list(skeleton._no_split_modules)
    if args.smoke:
        names = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
        device_map = {"model.embed_tokens": "cpu", **dict.fromkeys(names, "cpu"),
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    else:
        memory = get_balanced_memory(skeleton, dtype=dtype, no_split_module_classes=blocks)
        device_map = infer_auto_device_map(skeleton, max_memory=memory, dtype=dtype,
                                           no_split_module_classes=blocks)  # fmt: skip
    del skeleton
    started = time.perf_counter()
    hf = materialise(config, device_map, dtype)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    creation = time.perf_counter() - started
    model = load_model(hf, tokenizer=word_tokenizer(), device_map=device_map, verbose=False)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(10, config.vocab_size, (args.batch, args.seq), generator=generator)
               for _ in range(args.batches)]  # fmt: skip
    first = model.device
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=first)

    def forward_decoder(ids):
        with torch.inference_mode():
            model.hf.get_decoder()(input_ids=ids.to(first), attention_mask=mask)

    def mahals_capture(ids):
        out = capture(model, [row.tolist() for row in ids], pool="mean", batch_size=args.batch,
                      progress=False)  # fmt: skip
        assert out.tensor.shape[1] == config.num_hidden_layers

    def timed(fn) -> float:
        fn(batches[0])
        best = float("inf")
        for _ in range(args.repeats):
            _sync()
            start = time.perf_counter()
            for batch in batches:
                fn(batch)
            _sync()
            best = min(best, time.perf_counter() - start)
        return best

    tokens = args.batch * args.seq * args.batches
    decoder = tokens / timed(forward_decoder)
    captured = tokens / timed(mahals_capture)
    vector = SteeringVector(torch.randn(config.num_hidden_layers, config.hidden_size,
                                        generator=torch.Generator().manual_seed(1)),
                            layers=tuple(range(config.num_hidden_layers)))  # fmt: skip
    texts = prompts(random.Random(1), 2)
    plain = model.generate(texts, max_new_tokens=16).token_ids
    with steer(
        model, Steering(vector, alpha=0.5, layers=tuple(range(config.num_hidden_layers // 2)))
    ):
        steered = model.generate(texts, max_new_tokens=16).token_ids
    devices = sorted({str(d) for d in device_map.values()})
    row = {
        "experiment": "big", "shape": "tiny-llama70b" if args.smoke else "Llama-3.1-70B",
        "dtype": str(dtype), "devices": devices, "layers_per_device": {
            d: sum(1 for k, v in device_map.items() if k.startswith("model.layers.") and str(v) == d)
            for d in devices},
        "weight_creation_seconds": round(creation, 2), "batch": args.batch, "seq": args.seq,
        "batches": args.batches, "tok_per_s": {"forward_decoder": round(decoder), "mahals": round(captured)},
        "capture_vs_decoder": round(captured / decoder, 3),
        "steered_generation_differs": steered != plain, "generated_tokens": [len(t) for t in steered],
    }  # fmt: skip
    if torch.cuda.is_available():
        row["peak_gb_per_gpu"] = [round(torch.cuda.max_memory_allocated(i) / 1e9, 1)
                                  for i in range(torch.cuda.device_count())]  # fmt: skip
    model.free()
    return row


def _sync() -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--only", nargs="+", choices=("split", "fanout", "big"),
                        default=["split", "fanout", "big"])  # fmt: skip
    parser.add_argument("--texts", type=int, default=64, help="split: prompts compared")
    parser.add_argument("--per-cell", type=int, default=100, help="fanout: rows per cell (8 cells)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", choices=("ray", "processes"),
                        default="ray" if importlib.util.find_spec("ray") else "processes",
                        help="fanout: Ray tasks (default when installed) or one process per GPU")  # fmt: skip
    parser.add_argument("--ray-start", nargs="+", choices=("local", "no_prestart", "cluster", "warm"),
                        default=["local"],
                        help="fanout under Ray, one run each: a Ray the run starts itself as mahals "
                             "does (local), the same without Ray's idle worker processes started "
                             "per CPU (no_prestart), the cluster running already (cluster: "
                             "`ray start --head` before the run's clock), or that cluster with warm "
                             "workers up (warm: `mahals workers up` before the clock)")  # fmt: skip
    parser.add_argument("--json", help="append each result row as JSON to this file")
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.per_cell, args.batch, args.seq, args.batches, args.repeats = (
            8,
            6,
            2,
            16,
            2,
            1,
        )
    gpus = 0 if args.smoke else torch.cuda.device_count()
    if not args.smoke and gpus < (2 if {"split", "big"} & set(args.only) else 1):
        raise SystemExit(f"split and big need at least 2 GPUs, this machine has {gpus} (or --smoke)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    card = "CPU" if args.smoke else torch.cuda.get_device_name()
    stamp = {"date": datetime.date.today().isoformat(), "card": card, "gpus": gpus}
    if "split" in args.only:
        device_map = {"": "cpu"} if args.smoke else "auto"
        if args.smoke:  # the hooked split path, every part on the CPU
            n = tiny(shapes.SHAPES["llama"]()).num_hidden_layers
            device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
        report({**stamp, **split_equals_single(args, device_map, dtype)}, args.json)
    if "fanout" in args.only:
        report({**stamp, **fanout(args, gpus)}, args.json)
    if "big" in args.only:
        report({**stamp, **big_model(args, dtype)}, args.json)


if __name__ == "__main__":
    main()
