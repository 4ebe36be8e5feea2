"""MKS2 patching of a Hugging Face Llama: identity at insertion, undo, refusal, freezing, adapters round
trip."""

import pytest
import torch
from helpers import assert_close

from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
from mkfast.mks2.adapters import load_adapters, read_adapter_config, save_adapters
from mkfast.mks2.build import SmallLlamaConfig, build_mks2, small_llama
from mkfast.mks2.patching import (
    VISUAL_MEMORY,
    add_visual_memory,
    patch_state,
    remove_visual_memory,
    visual_memories,
)
from mkfast.mks2.samples import caption_sample

# Odd sizes on purpose: hidden 36 gives an MVM inner size of 9, 3 layers, a 7-token batch of 2.
ODD_CONFIG = SmallLlamaConfig(vocab_size=40, hidden_size=36, intermediate_size=52, num_hidden_layers=3,
                              num_attention_heads=3, num_key_value_heads=1)


@pytest.fixture
def tokenizer():
    return word_level_tokenizer(demo_vocabulary())


def _input_ids(vocab_size=40):
    return torch.randint(4, vocab_size, (2, 7))


def _randomize_visual_memory(model):
    """A trained-looking memory: non-zero fc2, so the patch changes the output."""
    with torch.no_grad():
        for memory in visual_memories(model):
            memory.fc2.weight.normal_(std=0.2)


def test_fresh_visual_memory_leaves_logits_bit_identical():
    model = small_llama(ODD_CONFIG)
    input_ids = _input_ids()
    before = model(input_ids).logits
    returned = add_visual_memory(model, ratio=0.25)
    assert returned is model and patch_state(model) == VISUAL_MEMORY
    assert visual_memories(model)[0].fc1.weight.shape == (9, 36)
    assert torch.equal(model(input_ids).logits, before)


def test_visual_memory_computes_h_f_then_the_block_mlp():
    """Layer output = h_F + MLP(post_norm(h_F)), h_F = h_s + MVM(norm(h_s)) (MKS2 eq. 1), checked on one
    layer."""
    model = small_llama(ODD_CONFIG)
    layer = model.model.layers[0]
    original_mlp, original_norm = layer.mlp, layer.post_attention_layernorm
    add_visual_memory(model)
    _randomize_visual_memory(model)
    memory = visual_memories(model)[0]
    h_s = torch.randn(2, 5, 36)
    h_f = h_s + memory(h_s)
    expected = h_f + original_mlp(original_norm(h_f))
    actual = h_s + layer.mlp(layer.post_attention_layernorm(h_s))  # what the transformers layer computes
    assert_close(actual, expected)


def test_remove_restores_the_original_modules_and_logits():
    model = small_llama(ODD_CONFIG)
    input_ids = _input_ids()
    before = model(input_ids).logits
    mlp, norm = model.model.layers[1].mlp, model.model.layers[1].post_attention_layernorm
    add_visual_memory(model)
    _randomize_visual_memory(model)
    assert not torch.equal(model(input_ids).logits, before)
    assert remove_visual_memory(model) is model
    assert model.model.layers[1].mlp is mlp and model.model.layers[1].post_attention_layernorm is norm
    assert patch_state(model) is None
    assert torch.equal(model(input_ids).logits, before)


def test_patching_twice_or_removing_nothing_is_refused():
    model = small_llama(ODD_CONFIG)
    with pytest.raises(RuntimeError, match="no visual memory"):
        remove_visual_memory(model)
    add_visual_memory(model)
    with pytest.raises(RuntimeError, match="already patched"):
        add_visual_memory(model)


def test_non_llama_model_is_refused_clearly():
    with pytest.raises(TypeError, match="LlamaForCausalLM-like"):
        add_visual_memory(torch.nn.Linear(3, 3))


def test_only_visual_memory_and_stage1_heads_are_trainable(tokenizer):
    model = build_mks2(small_llama(ODD_CONFIG, tokenizer), image_size=16)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert (".visual_memory." in name or name.startswith(("vision.projection", "vision.image_",
                                                               "text_to_image_head", "logit_scale"))), name
    assert all(".visual_memory." in name for name in trainable if name.startswith("language_model."))


def test_adapters_round_trip_reproduces_logits_exactly(tokenizer, tmp_path):
    """Save the trained-looking adapters, build a fresh MKS2 on the same base, load: same logits bit for
    bit."""
    config = SmallLlamaConfig(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=52,
                              num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1)
    model = build_mks2(small_llama(config, tokenizer, seed=1), image_size=16)
    _randomize_visual_memory(model.language_model)
    with torch.no_grad():
        model.vision.projection.weight.normal_()
        model.vision.image_start.normal_()
    samples = [caption_sample(tokenizer, "a handwritten digit seven", 0),
               caption_sample(tokenizer, "a digit", 1)]
    images = torch.rand(2, 3, 16, 16)
    expected, _ = model.forward_logits(samples, images)
    names = save_adapters(model, str(tmp_path))
    assert read_adapter_config(str(tmp_path))["stage"] == VISUAL_MEMORY
    assert not any(name.startswith("language_model.model.embed_tokens") or ".self_attn." in name
                   for name in names)
    assert not any(name.startswith("vision.vision_model") for name in names)
    fresh = build_mks2(small_llama(config, tokenizer, seed=1), image_size=16)
    unloaded, _ = fresh.forward_logits(samples, images)
    assert not torch.equal(unloaded, expected)
    load_adapters(fresh, str(tmp_path))
    actual, _ = fresh.forward_logits(samples, images)
    assert torch.equal(actual, expected)
