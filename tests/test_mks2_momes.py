"""MKS2 stage 2 patching: MoMEFFN in every layer, router mixture, freezing, undo, adapters round trip."""

import pytest
import torch
from helpers import assert_close

from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
from mkfast.mks2.adapters import load_adapters, read_adapter_config, save_adapters
from mkfast.mks2.build import SmallLlamaConfig, build_mks2, small_llama
from mkfast.mks2.patching import (
    MOMES,
    VISUAL_MEMORY,
    add_visual_memory,
    decoder_layers,
    disable_momes,
    enable_momes,
    patch_state,
    remove_visual_memory,
    router_probabilities,
    visual_memories,
)
from mkfast.mks2.samples import instruction_sample

ODD_CONFIG = SmallLlamaConfig(vocab_size=40, hidden_size=36, intermediate_size=52, num_hidden_layers=3,
                              num_attention_heads=3, num_key_value_heads=1)


def _perturb_adapters(model):
    """Stage 1: a non-zero MVM fc2. Stage 2: non-zero LoRA and a non-uniform router (the MVM left as
    trained)."""
    with torch.no_grad():
        if patch_state(model) == VISUAL_MEMORY:
            for memory in visual_memories(model):
                memory.fc2.weight.normal_(std=0.2)
        for layer in decoder_layers(model):
            if patch_state(model) == MOMES:
                for parameter in layer.mlp.parameters(recurse=False):
                    parameter.normal_(std=0.1)
                layer.mlp.router.weight.normal_(std=0.5)
                layer.mlp.router.bias.normal_(std=0.5)


def _patched_model():
    model = small_llama(ODD_CONFIG)
    add_visual_memory(model)
    _perturb_adapters(model)
    assert enable_momes(model, rank=4, alpha=8) is model
    _perturb_adapters(model)
    return model


def test_router_outputs_sum_to_one_per_token():
    model = _patched_model()
    hidden = torch.randn(2, 7, 36) * 3
    for layer in decoder_layers(model):
        probabilities = router_probabilities(layer.mlp, hidden)
        assert probabilities.shape == (2, 7, 2)
        assert_close(probabilities.sum(-1), torch.ones(2, 7))
        assert (probabilities > 0).all()
        assert probabilities[..., 0].std() > 0, "the router gives every token the same weights"


def test_layer_output_is_the_router_weighted_sum_of_the_two_experts():
    """h_o = h_s + S_1 h_VE + S_2 h_TE (MKS2 eq. 4): each expert isolated by saturating the router."""
    model = _patched_model()
    mome = decoder_layers(model)[0].mlp
    hidden = torch.randn(2, 5, 36)
    probabilities = router_probabilities(mome, hidden)
    # What the transformers layer computes with post_attention_layernorm = Identity.
    mixed = hidden + mome(hidden)
    weight, bias = mome.router.weight.detach().clone(), mome.router.bias.detach().clone()
    experts = []
    for favoured in (0, 1):
        with torch.no_grad():
            mome.router.weight.zero_()
            mome.router.bias.copy_(torch.tensor([60.0, -60.0]) * (1 if favoured == 0 else -1))
        experts.append(mome(hidden))
    with torch.no_grad():
        mome.router.weight.copy_(weight)
        mome.router.bias.copy_(bias)
    visual, text = experts
    assert not torch.allclose(visual, text)
    expected = hidden + probabilities[..., :1] * visual + probabilities[..., 1:] * text
    assert_close(mixed, expected)


def test_only_lora_and_router_train_in_stage_two():
    model = _patched_model()
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert len(trainable) == 3 * (10 + 2)  # per layer: 5 projections x (A, B) + router weight and bias
    assert all("_lora_" in name or ".router." in name for name in trainable)


def test_enable_momes_needs_visual_memory_and_refuses_twice():
    model = small_llama(ODD_CONFIG)
    with pytest.raises(RuntimeError, match="add_visual_memory first"):
        enable_momes(model)
    add_visual_memory(model)
    enable_momes(model)
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_momes(model)


def test_disable_momes_then_remove_restores_the_base_model():
    model = small_llama(ODD_CONFIG)
    input_ids = torch.randint(4, 40, (2, 6))
    before = model(input_ids).logits
    add_visual_memory(model)
    _perturb_adapters(model)
    with_memory = model(input_ids).logits
    enable_momes(model)
    _perturb_adapters(model)
    assert not torch.equal(model(input_ids).logits, with_memory)
    assert disable_momes(model) is model and patch_state(model) == VISUAL_MEMORY
    assert torch.equal(model(input_ids).logits, with_memory)
    remove_visual_memory(model)
    assert torch.equal(model(input_ids).logits, before)


def test_momes_adapters_round_trip_reproduces_logits_exactly(tmp_path):
    tokenizer = word_level_tokenizer(demo_vocabulary())
    config = SmallLlamaConfig(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=52,
                              num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1)
    model = build_mks2(small_llama(config, tokenizer, seed=2), image_size=16)
    _perturb_adapters(model.language_model)
    enable_momes(model.language_model, rank=4, alpha=8)
    _perturb_adapters(model.language_model)
    samples = [instruction_sample(tokenizer, "[INST] which digit is shown ? [/INST]", "seven", 0),
               instruction_sample(tokenizer, "[INST] what is one plus two ? [/INST]", "three")]
    images = torch.rand(1, 3, 16, 16)
    expected, _ = model.forward_logits(samples, images)
    names = save_adapters(model, str(tmp_path))
    config_saved = read_adapter_config(str(tmp_path))
    assert config_saved["stage"] == MOMES and config_saved["lora_rank"] == 4
    assert any("gate_proj_lora_A" in name for name in names)
    assert any(".visual_memory.fc1" in name for name in names)
    assert not any(name.endswith("mlp.mlp.gate_proj.weight") for name in names)
    fresh = build_mks2(small_llama(config, tokenizer, seed=2), image_size=16)
    load_adapters(fresh, str(tmp_path))
    assert patch_state(fresh.language_model) == MOMES
    actual, _ = fresh.forward_logits(samples, images)
    assert torch.equal(actual, expected)
