"""Random-weight models in the real architectures' shapes, for GPU benchmarks (the GPU machine
cannot reach the hub; compute does not depend on weight values), and a word-level tokenizer
with a chat template so the pipelines run unchanged on synthetic text."""

from __future__ import annotations

import json
import random
import time
import zlib

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from mahals.models import load_model
from mahals.registry import ModelSpec

_LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
_MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8)

# Architecture of each registry model -> its real config (published config.json values).
SHAPES = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_8B),
    "mistral": lambda: transformers.MistralConfig(**_MISTRAL_7B, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False),
}  # fmt: skip

WORDS = (
    "how can i make a safe plan for my family to travel abroad without losing money what is the "
    "best way to learn about history science art music write an essay on justice rights duty "
    "kill python process steal heart attack the party shoot photo explain why people hurt others "
    "tell me where to buy tools for the garden and how to fix a broken chair at home today"
).split()


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over :data:`WORDS` with a chat template (ids < 200)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "[user]", "[assistant]", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s> [{{ m['role'] }}] {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> [assistant] {% endif %}"
    )
    return tok


def random_sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class RandomLoader:
    """A :data:`mahals.pipelines.common.ModelLoader` building random bf16 models on the GPU;
    records how long weight creation took so benchmarks can exclude it."""

    def __init__(self, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.tokenizer = word_tokenizer()
        self.load_seconds: dict[str, float] = {}
        self.weight_bytes: dict[str, int] = {}
        self.banked_peak = 0

    def peak_memory(self) -> int:
        """Peak allocated GPU bytes outside weight creation, since this loader was made."""
        return max(self.banked_peak, torch.cuda.max_memory_allocated())

    def __call__(self, spec: ModelSpec):
        # Random initialisation allocates temporaries a real (safetensors) load does not; keep
        # the pipeline's own peak: the peak so far is banked, and counting restarts once the
        # weights exist.
        self.banked_peak = max(self.banked_peak, torch.cuda.max_memory_allocated())
        started = time.perf_counter()
        config = SHAPES[spec.architecture]()
        # Same weights in every process (a Ray worker starts with a fresh RNG).
        torch.manual_seed(zlib.crc32(spec.key.encode()))
        with torch.device(self.device):
            hf = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16,
                attn_implementation="eager" if spec.architecture == "gemma2" else "sdpa",
            )  # fmt: skip
        model = load_model(hf, tokenizer=self.tokenizer)
        self.weight_bytes[spec.key] = sum(p.numel() * p.element_size() for p in hf.parameters())
        model.name = spec.key
        model.spec = spec
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.load_seconds[spec.key] = self.load_seconds.get(spec.key, 0.0) + time.perf_counter() - started
        return model

    def tokenizer_loader(self, spec: ModelSpec):
        return self.tokenizer


def report(row: dict, json_path: str | None) -> None:
    """Print a result row as JSON and append it to ``json_path`` (JSON lines) when given."""
    print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
