"""The one-call drop-in: mkfast.apply_mks2 / remove_mks2 / save_mks2 / load_mks2 on tiny random
Llama, Mistral and Qwen2 models, fp32 and bf16 (CPU); layers aligning dtype and device."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_close
from torch import nn

import mkfast
from mkfast.layers import MoMEFFN, VisualMemory
from mkfast.mks2.patching import MOMES, VISUAL_MEMORY, patch_state, visual_memories

transformers = pytest.importorskip("transformers")
from hf_models import ARCHITECTURES, tiny_causal_lm  # noqa: E402

# Odd sizes: hidden 36 (MVM inner 9), 3 heads of 12, 1 key/value head, 3 layers.
TINY = {"vocab_size": 53, "hidden_size": 36, "intermediate_size": 52, "num_hidden_layers": 3,
        "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 64}
DTYPES = [torch.float32, torch.bfloat16]


def tiny_model(architecture: str, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    return tiny_causal_lm(architecture, {**TINY, **overrides}, dtype)


def _input_ids(batch=2, length=7):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_visual_memory_stage_is_the_identity_at_insertion_in_the_models_dtype(architecture, dtype):
    model = tiny_model(architecture, dtype)
    input_ids = _input_ids()
    embeddings = model.get_input_embeddings()(input_ids).detach()

    def logits_and_input_gradient():
        inputs = embeddings.clone().requires_grad_()
        output = model(inputs_embeds=inputs, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), inputs.grad

    before = logits_and_input_gradient()
    assert mkfast.apply_mks2(model, stage=VISUAL_MEMORY) is model
    after = logits_and_input_gradient()
    assert torch.equal(after[0], before[0])  # fc2 starts at zero: logits bit for bit
    assert_close(after[1], before[1])  # gradients: the same terms, summed in another order by autograd
    memory = visual_memories(model)[0]
    assert {parameter.dtype for parameter in memory.parameters()} == {dtype}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".visual_memory." in name for name in trainable)  # MKS2 stage 1 trains MVMs only


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_momes_stage_trains_lora_and_router_only_and_matches_the_reference(architecture):
    model = tiny_model(architecture)
    mkfast.apply_mks2(model, rank=4, alpha=8)
    assert patch_state(model) == MOMES
    trainable = {name.rsplit(".", 2)[-2] if "router" in name else name.rsplit(".", 1)[-1]
                 for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {f"{projection}_lora_{part}" for projection in
                         ("gate_proj", "up_proj", "down_proj", "fc1", "fc2") for part in "AB"} | {"router"}
    layer = model.model.layers[1]
    assert isinstance(layer.post_attention_layernorm, nn.Identity)  # the MoMEFFN applies the norm itself
    hidden = torch.randn(2, 5, TINY["hidden_size"])
    mome = layer.mlp
    probabilities = torch.softmax(mome.router(mome.norm(hidden)), dim=-1)
    expected = (probabilities[..., :1] * mome.visual_memory(hidden)
                + probabilities[..., 1:] * mome.mlp(mome.norm(hidden)))
    with torch.no_grad():
        assert_close(mome(hidden), expected)  # fresh LoRA (B = 0): the frozen experts, mixed by the router


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_remove_restores_modules_trainability_and_logits(architecture):
    model = tiny_model(architecture)
    model.lm_head.weight.requires_grad_(False)  # a user's own choice survives the round trip
    original = {name: (parameter, parameter.requires_grad) for name, parameter in model.named_parameters()}
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].post_attention_layernorm
    input_ids = _input_ids()
    with torch.no_grad():
        before = model(input_ids).logits
    mkfast.apply_mks2(model)
    with pytest.raises(RuntimeError, match="already patched"):
        mkfast.apply_mks2(model)
    assert mkfast.remove_mks2(model) is model
    assert model.model.layers[0].mlp is mlp and model.model.layers[0].post_attention_layernorm is norm
    restored = dict(model.named_parameters())
    assert set(restored) == set(original)
    for name, (parameter, requires_grad) in original.items():
        assert restored[name] is parameter and parameter.requires_grad == requires_grad, name
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)
    with pytest.raises(RuntimeError, match="no MKS2 patch"):
        mkfast.remove_mks2(model)


def _train_a_little(model):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))


@pytest.mark.parametrize("stage", [VISUAL_MEMORY, MOMES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adapters_round_trip_through_a_directory_in_one_line(tmp_path, stage, dtype):
    trained = mkfast.apply_mks2(tiny_model("qwen2", dtype), stage=stage, rank=4, alpha=8, ratio=0.5)
    _train_a_little(trained)
    input_ids = _input_ids()
    with torch.no_grad():
        expected = trained(input_ids).logits
    names = mkfast.save_mks2(trained, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["stage"] == stage and config["model_type"] == "qwen2" and config["tensor_names"] == names
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    assert not any("self_attn" in name or "embed_tokens" in name for name in names)  # never the base weights

    restored = mkfast.load_mks2(tiny_model("qwen2", dtype), str(tmp_path))  # the same base, unpatched
    assert patch_state(restored) == stage
    with torch.no_grad():
        assert torch.equal(restored(input_ids).logits, expected)


def test_adapters_refuse_a_model_of_another_size_before_changing_it(tmp_path):
    mkfast.save_mks2(mkfast.apply_mks2(tiny_model("llama")), str(tmp_path))
    wider = tiny_model("llama", hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="size 36, the model has 3 of size 48"):
        mkfast.load_mks2(wider, str(tmp_path))
    assert patch_state(wider) is None


def test_unsupported_architectures_are_refused_with_the_reason():
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**TINY, "head_dim": 12}))
    with pytest.raises(TypeError, match=r"'gemma' is not supported \(Gemma's RMSNorm scales by \(1 \+ "):
        mkfast.apply_mks2(gemma)
    with pytest.raises(TypeError, match="'gemma' is not supported"):
        mkfast.apply_attention(gemma)


def test_a_llama_whose_norm_has_a_one_plus_weight_offset_is_refused():
    model = tiny_model("llama")

    class OffsetRMSNorm(nn.Module):  # Gemma's form under a Llama model type
        def __init__(self, norm):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros_like(norm.weight)), 1e-6

        def forward(self, hidden):
            return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    for layer in model.model.layers:
        layer.post_attention_layernorm = OffsetRMSNorm(layer.post_attention_layernorm)
    with pytest.raises(TypeError, match=r"\(1 \+ weight\) offset"):
        mkfast.apply_mks2(model)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mome_layer_by_hand_aligns_a_default_memory_and_refuses_the_double_norm(dtype):
    model = tiny_model("llama", dtype)
    block = model.model.layers[0]
    memory = VisualMemory(TINY["hidden_size"])  # defaults: fp32, CPU
    block.mlp = MoMEFFN(block.mlp, memory, block.post_attention_layernorm, rank=4, alpha=8)
    assert memory.fc1.weight.dtype == dtype
    input_ids = _input_ids()
    with torch.no_grad(), pytest.raises(RuntimeError, match="post_attention_layernorm = torch.nn.Identity()"):
        model(input_ids)  # the block would normalise twice
    block.post_attention_layernorm = nn.Identity()
    with torch.no_grad():
        assert model(input_ids).logits.dtype == dtype


def test_visual_memory_takes_device_and_dtype_like_nn_linear():
    memory = VisualMemory(8, ratio=0.5, device="cpu", dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in memory.parameters()} == {torch.bfloat16}
    assert memory(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
