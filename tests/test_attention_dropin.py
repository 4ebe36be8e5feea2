"""mkfast.apply_attention on tiny random Llama, Mistral and Qwen2 against the same weights on SDPA:
padded training batches (logits and gradients, fp32 and bf16), packed batches from transformers'
flattening collator (equal to separate sequences, blocks between documents skipped), and greedy
generate() with dynamic and static caches over left-padded prompts, token for token."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import mkfast
from mkfast.layers import attention as attention_layer

transformers = pytest.importorskip("transformers")
from hf_models import ARCHITECTURES, assert_greedy_equal_up_to_near_ties, tiny_causal_lm  # noqa: E402

TINY = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def model_pair(architecture: str, dtype: torch.dtype = torch.float32):
    """(mkfast, sdpa): one random tiny model and a copy switched by mkfast.apply_attention."""
    sdpa, ours = tiny_causal_lm(architecture, TINY, dtype), tiny_causal_lm(architecture, TINY, dtype)
    assert mkfast.apply_attention(ours) is ours
    return ours, sdpa


@pytest.fixture
def seen(monkeypatch):
    """The document_ids each mkfast.ops.attention call got, and the decode calls."""
    record = {"attention": [], "decode_attention": 0}
    attention, decode = attention_layer.attention, attention_layer.decode_attention

    def attention_spy(*args, **kwargs):
        record["attention"].append(kwargs.get("document_ids"))
        return attention(*args, **kwargs)

    def decode_spy(*args, **kwargs):
        record["decode_attention"] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(attention_layer, "attention", attention_spy)
    monkeypatch.setattr(attention_layer, "decode_attention", decode_spy)
    return record


def _left_padded_prompts():
    input_ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[2, :5] = 0
    return input_ids * attention_mask, attention_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_right_padded_training_batch_matches_sdpa_logits_and_gradients(architecture, dtype, seen):
    ours, sdpa = model_pair(architecture, dtype)
    input_ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    results = [model(input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
               for model in (ours, sdpa)]
    for result in results:
        result.loss.backward()
    assert len(seen["attention"]) == TINY["num_hidden_layers"]
    assert seen["attention"][0][1].tolist() == [0] * 6 + [1] * 5  # padding: a document of its own
    valid = attention_mask.bool()
    # bf16: the two paths round the attention output differently; two layers and the head widen it.
    scale = 1.0 if dtype == torch.float32 else 4.0
    assert_close(results[0].logits[valid], results[1].logits[valid].detach(), scale=scale)
    for (name, parameter), expected in zip(ours.named_parameters(), sdpa.parameters(), strict=True):
        assert_close(parameter.grad, expected.grad, scale=scale, message=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_flattening_collator_batch_equals_sequences_run_separately(architecture, seen):
    ours, _ = model_pair(architecture)
    lengths = (5, 3, 8)
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(1, 97, (length,), generator=generator).tolist() for length in lengths]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": sequence} for sequence in sequences])
    with torch.no_grad():
        packed = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=False).logits
        separate = torch.cat([ours(torch.tensor([sequence]), use_cache=False).logits
                              for sequence in sequences], dim=1)
    assert_close(packed, separate)
    document_ids = seen["attention"][0]
    assert document_ids[0].tolist() == [0] * 5 + [1] * 3 + [2] * 8


def test_flattening_collator_flash_kwargs_without_position_ids_keep_sequences_apart(seen):
    ours, _ = model_pair("llama")
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True,
                                                       return_position_ids=False)
    logits = []
    for first in ([5, 8, 13, 21], [9, 9, 2, 40]):  # only the first sequence changes
        batch = collator([{"input_ids": sequence} for sequence in (first, [3, 1, 4], [2, 7, 1, 8, 2])])
        with torch.no_grad():
            logits.append(ours(**batch, use_cache=False).logits)
    assert seen["attention"][0][0].tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert not torch.allclose(logits[0][:, :4], logits[1][:, :4])
    assert torch.equal(logits[0][:, 4:], logits[1][:, 4:])  # the later sequences never see the first


@pytest.mark.interpreter
def test_packed_training_skips_the_blocks_between_documents(seen):
    """Through the Triton kernel (interpreter): the document ids derived from position_ids reach
    the kernel, whose launcher visits only the key blocks whose documents meet each query block's."""
    from mkfast.kernels.attention import INTERPRETER_CONFIG, meeting_block_spans

    ours, sdpa = model_pair("llama")
    lengths = (30, 34, 32)  # 96 tokens: three 32-token blocks under the interpreter; document 2 = block 2
    generator = torch.Generator().manual_seed(5)
    batch = transformers.DataCollatorWithFlattening()(
        [{"input_ids": torch.randint(1, 97, (length,), generator=generator).tolist()} for length in lengths])
    with mkfast.use_backend("triton"):
        loss = ours(**batch, use_cache=False).loss
        loss.backward()
    expected = sdpa(**batch, use_cache=False).loss
    expected.backward()
    assert_close(loss, expected.detach())
    for (name, parameter), wanted in zip(ours.named_parameters(), sdpa.parameters(), strict=True):
        assert_close(parameter.grad, wanted.grad, message=name)
    assert all(ids is seen["attention"][0] for ids in seen["attention"])  # derived once per batch
    block_m, block_n = INTERPRETER_CONFIG[:2]
    first, last = meeting_block_spans(seen["attention"][0].to(torch.int32), block_m, block_n)
    # Query block 2 (tokens 64-95, all of document 2) visits key block 2 alone: causal attention
    # would visit blocks 0-2. Block 0 (documents 0 and 1) meets key blocks 0-1 (causal trims to 0).
    assert first[0].tolist() == [0, 0, 2]
    assert last[0].tolist() == [2, 2, 3]


def _greedy_generations(architecture: str, cache: str, max_new_tokens: int, backend: str = "auto"):
    """(mkfast's, SDPA's) greedy continuations of the left-padded prompts."""
    ours, sdpa = model_pair(architecture)
    input_ids, attention_mask = _left_padded_prompts()
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": 0,
                "attention_mask": attention_mask, "cache_implementation": cache}
    with torch.no_grad():
        expected = sdpa.generate(input_ids, **settings)
        with mkfast.use_backend(backend):
            generated = ours.generate(input_ids, **settings)
    return generated, expected


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_left_padded_greedy_generation_is_token_equal_to_sdpa(architecture, cache, seen):
    generated, expected = _greedy_generations(architecture, cache, max_new_tokens=5)
    assert torch.equal(generated, expected)
    # Prefill through the main op with padding as documents; 4 later steps per layer on the
    # rows' views (3 distinct starts), by the decode op (auto backend on CPU: its reference).
    assert len(seen["attention"]) == TINY["num_hidden_layers"]
    assert seen["decode_attention"] == 4 * TINY["num_hidden_layers"] * 3


@pytest.mark.interpreter
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generation_through_the_triton_kernels_is_token_equal_to_sdpa(cache, seen):
    """The Triton main and decode kernels (interpreter on CPU) on the rows' key views."""
    generated, expected = _greedy_generations("llama", cache, max_new_tokens=3, backend="triton")
    assert torch.equal(generated, expected)
    assert seen["decode_attention"] == 2 * TINY["num_hidden_layers"] * 3


def test_static_cache_prefill_logits_match_sdpa_without_padding():
    """Static-cache prefill hands over keys of length max_cache_len with no mask: the empty
    slots must be left out (queries at the first positions, not the last)."""
    ours, sdpa = model_pair("llama")
    input_ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    logits = []
    for model in (ours, sdpa):
        cache = transformers.StaticCache(config=model.config, max_cache_len=40)
        with torch.no_grad():
            logits.append(model(input_ids, cache=cache, use_cache=True).logits)
    assert_close(logits[0], logits[1])


def test_generation_under_a_forced_cpu_backend_uses_it_per_op(seen):
    # decode_attention has no cpu backend: under use_backend("cpu") its steps take the main op.
    generated, expected = _greedy_generations("qwen2", "dynamic", max_new_tokens=4, backend="cpu")
    assert torch.equal(generated, expected)
    assert seen["decode_attention"] == 0


def test_the_mask_is_built_once_per_forward(monkeypatch):
    ours, _ = model_pair("mistral")
    built = []
    original = attention_layer.mkfast_mask

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "mkfast", counting)
    input_ids, attention_mask = _left_padded_prompts()
    with torch.no_grad():
        ours(input_ids, attention_mask=attention_mask, use_cache=False)
    assert len(built) == 1


def test_apply_attention_refuses_twice_and_remove_restores():
    ours, _ = model_pair("llama")
    with pytest.raises(RuntimeError, match="already uses mkfast attention"):
        mkfast.apply_attention(ours)
    assert mkfast.remove_attention(ours) is ours
    assert ours.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="not switched by apply_attention"):
        mkfast.remove_attention(ours)


def test_keys_beyond_the_sliding_window_are_refused():
    ours, _ = model_pair("mistral")
    ours.config.sliding_window = 8  # Mistral reads it at each forward
    with pytest.raises(ValueError, match="sliding_window=8"):
        ours(torch.randint(1, 97, (1, 12)), use_cache=False)


@pytest.mark.cuda
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuda_padded_packed_and_cached_paths_match_sdpa(architecture):
    """On the GPU's Triton kernels: a right-padded bf16 training step, a packed fp32 batch, and
    left-padded greedy generation with dynamic and static caches (fp32, up to near-ties)."""
    sizes = {**TINY, "hidden_size": 256, "intermediate_size": 384}  # head dim 64
    sdpa, ours = (tiny_causal_lm(architecture, sizes).cuda() for _ in range(2))
    mkfast.apply_attention(ours)
    input_ids, attention_mask = (tensor.cuda() for tensor in _left_padded_prompts())
    for cache in ("dynamic", "static"):
        settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
                    "attention_mask": attention_mask, "cache_implementation": cache}
        with torch.no_grad():
            generated, expected = ours.generate(input_ids, **settings), sdpa.generate(input_ids, **settings)
        assert_greedy_equal_up_to_near_ties(sdpa, input_ids, generated, expected, attention_mask)
    position_ids = torch.cat([torch.arange(70), torch.arange(58)])[None].cuda()
    packed_ids = torch.randint(1, 97, (1, 128), device="cuda")
    with torch.no_grad():
        packed = ours(packed_ids, position_ids=position_ids, use_cache=False).logits
        separate = torch.cat([sdpa(packed_ids[:, :70], use_cache=False).logits,
                              sdpa(packed_ids[:, 70:], use_cache=False).logits], dim=1)
    assert_close(packed, separate, dtype=torch.float32, scale=10.0)  # fp32 Triton vs SDPA summation order
    sdpa, ours = sdpa.to(torch.bfloat16), ours.to(torch.bfloat16)
    train_ids = torch.randint(1, 97, (2, 150), device="cuda")
    train_mask = torch.ones_like(train_ids)
    train_mask[1, 100:] = 0
    labels = train_ids.masked_fill(train_mask == 0, -100)
    losses = [model(train_ids, attention_mask=train_mask, labels=labels, use_cache=False).loss
              for model in (ours, sdpa)]
    for loss in losses:
        loss.backward()
    assert_close(losses[0], losses[1].detach(), dtype=torch.bfloat16)
    assert_close(ours.model.layers[0].self_attn.q_proj.weight.grad,
                 sdpa.model.layers[0].self_attn.q_proj.weight.grad,
                 dtype=torch.bfloat16, scale=5.0)  # bf16 gradients through two layers
