"""Registry, loading and architecture discovery: behaviour and error messages."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from mahals.arch import AdapterError, adapter_for, discover
from mahals.models import load_model
from mahals.registry import RegistryError, default_registry, load_registry

from conftest import build_tiny, tiny_config


def test_registry_holds_the_seven_pairs_of_the_study():
    registry = default_registry()
    expected = {
        "Mistral_7B": ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", 32, 4096),
        "Llama3_8B": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", 32, 4096),
        "Qwen2_7B": ("Qwen/Qwen2-7B", "Qwen/Qwen2-7B-Instruct", 28, 3584),
        "Gemma2_9B": ("google/gemma-2-9b", "google/gemma-2-9b-it", 42, 3584),
        "Falcon_7B": ("tiiuae/falcon-7b", "tiiuae/falcon-7b-instruct", 32, 4544),
        "Zephyr_7B": ("mistralai/Mistral-7B-v0.1", "HuggingFaceH4/zephyr-7b-beta", 32, 4096),
        "Llama31_Tulu": (
            "allenai/Llama-3.1-Tulu-3-8B-SFT",
            "allenai/Llama-3.1-Tulu-3-8B-DPO",
            32,
            4096,
        ),
        "Llama3_70B": ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", 80, 8192),
        "Llama31_Tulu_70B": (
            "allenai/Llama-3.1-Tulu-3-70B-SFT",
            "allenai/Llama-3.1-Tulu-3-70B-DPO",
            80,
            8192,
        ),
    }
    assert set(registry.pairs) == set(expected) | {"SmolLM2_format_demo", "SmolLM2_DPO_demo"}
    demo = registry.pair("SmolLM2_format_demo")
    assert demo.base is demo.tuned and demo.pairing == "native"
    for key, (base, tuned, layers, width) in expected.items():
        pair = registry.pair(key)
        assert (pair.base.source, pair.tuned.source) == (base, tuned)
        assert (pair.tuned.n_layers, pair.tuned.d_model) == (layers, width)
    assert registry.pair("Gemma2_9B").tuned.batch_size == 8
    assert registry.pair("Llama31_Tulu").tuning == "dpo"
    assert registry.pair("Llama31_Tulu_70B").tuning == "dpo"
    assert {registry.model(key).gpus for key in ("Llama-3.1-70B", "Llama-3.1-8B")} == {2, 1}
    assert registry.study("seed") == [
        "Llama3_8B",
        "Mistral_7B",
        "Qwen2_7B",
        "Gemma2_9B",
        "Falcon_7B",
        "Zephyr_7B",
    ]


def test_registry_shapes_match_the_architectures_configs():
    """The registry's layer counts and widths agree with the real configs' defaults where known."""
    registry = default_registry()
    assert registry.model("SmolLM2-135M-Instruct").d_model == 576
    assert registry.model("gemma-3-270m").n_layers == 18


def test_pair_key_is_refused_as_a_model_key():
    with pytest.raises(
        RegistryError,
        match=r"'Llama3_8B' is a model pair.*'Llama-3.1-8B' \(base\).*'Llama-3.1-8B-Instruct'",
    ):
        default_registry().model("Llama3_8B")


def test_unknown_keys_name_the_known_ones():
    with pytest.raises(RegistryError, match="unknown pair key 'Nope'.*Falcon_7B"):
        default_registry().pair("Nope")
    with pytest.raises(RegistryError, match="unknown model 'Llama3_8X'"):
        load_model("Llama3_8X")


def test_user_registry_extends_the_builtin(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "my-tuned": {
                        "source": "org/my-tuned",
                        "architecture": "llama",
                        "n_layers": 32,
                        "d_model": 4096,
                    }
                },
                "pairs": {"Mine": {"base": "Llama-3.1-8B", "tuned": "my-tuned", "tuning": "dpo"}},
            }
        )
    )
    registry = load_registry(path)
    assert registry.pair("Mine").base is registry.model("Llama-3.1-8B")
    assert "Falcon_7B" in registry.pairs
    path.write_text(json.dumps({"pairs": {"Bad": {"base": "Llama-3.1-8B", "tuned": "missing"}}}))
    with pytest.raises(RegistryError, match=r"pair 'Bad' names unknown models \['missing'\]"):
        load_registry(path)
    path.write_text(
        json.dumps(
            {
                "models": {
                    "x": {"source": "a/b", "architecture": "llama", "n_layers": 2, "d_model": 8},
                    "y": {"source": "a/c", "architecture": "llama", "n_layers": 3, "d_model": 8},
                },
                "pairs": {"XY": {"base": "x", "tuned": "y"}},
            }
        )
    )
    with pytest.raises(RegistryError, match="base x is 2x8 but tuned y is 3x8"):
        load_registry(path)


def test_missing_files_and_tokenizers_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="not found: .*nothing.gguf"):
        load_model(str(tmp_path / "nothing.gguf"))
    hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="no tokenizer"):
        load_model(hf)
    hf.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no tokenizer found for model .*ckpt"):
        load_model(str(tmp_path / "ckpt"), device="cpu")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    model = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert (model.n_layers, model.d_model, model.architecture) == (3, 64, "llama")


def test_dtype_defaults_to_fp32_on_cpu(tiny_tokenizer):
    model = build_tiny("qwen2", tiny_tokenizer)
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_a_built_model_stays_where_it_is_when_a_gpu_is_visible(tiny_tokenizer, monkeypatch):
    """nnsight wraps a built model in a transformers pipeline, whose default device is the
    first GPU when one is visible: the model must stay on the device it was given (or was
    asked to move to) all the same. With a GPU made to look visible, a pipeline that moved it
    would fail here (this torch has no CUDA) or leave it elsewhere."""
    import transformers.pipelines.base as pipelines

    monkeypatch.setattr(pipelines, "is_torch_cuda_available", lambda: True)
    for device in (None, "cpu"):
        hf = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
        model = load_model(hf, tokenizer=tiny_tokenizer, device=device)
        assert model.device == torch.device("cpu")
        assert {p.device.type for p in hf.parameters()} == {"cpu"}


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden):
        return hidden + self.proj(hidden)


class _Unknown(nn.Module):
    """A made-up architecture: blocks under ``backbone.blocks``, norm at ``backbone.norm_out``."""

    def __init__(self, n_layers: int = 3, width: int = 8, extra_list: bool = False) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=n_layers)
        self.config.model_type = "made_up"
        self.backbone = nn.Module()
        self.backbone.tok = nn.Embedding(10, width)
        self.backbone.blocks = nn.ModuleList(_Block(width) for _ in range(n_layers))
        if extra_list:
            self.backbone.shadow = nn.ModuleList(_Block(width) for _ in range(n_layers))
        self.backbone.norm_out = nn.LayerNorm(width)

    def get_input_embeddings(self):
        return self.backbone.tok

    def forward(self, input_ids):
        hidden = self.backbone.tok(input_ids)
        for block in self.backbone.blocks:
            hidden = block(hidden)
        return self.backbone.norm_out(hidden)


def test_discovery_finds_an_unknown_architecture():
    adapter = adapter_for(_Unknown())
    assert (adapter.layers, adapter.final_norm, adapter.embed) == (
        "backbone.blocks",
        "backbone.norm_out",
        "backbone.tok",
    )
    assert adapter.output_is_tuple is False


def test_discovery_refuses_to_guess_between_two_layer_lists():
    with pytest.raises(
        AdapterError,
        match=r"found 2 candidates among \[backbone.blocks \(3 x _Block\), backbone.shadow",
    ):
        discover(_Unknown(extra_list=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_free_returns_gpu_memory(tiny_tokenizer):
    before = torch.cuda.memory_allocated()
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.vocab_size = 1024, 4096, 32000
    hf = transformers.AutoModelForCausalLM.from_config(config).cuda()
    model = load_model(hf, tokenizer=tiny_tokenizer)
    del hf
    assert torch.cuda.memory_allocated() - before > 100e6
    held = model  # a caller still holding the wrapper must not keep the weights alive
    model.free()
    assert torch.cuda.memory_allocated() - before < 1e6
    with pytest.raises(RuntimeError, match="was freed"):
        _ = held.hf
