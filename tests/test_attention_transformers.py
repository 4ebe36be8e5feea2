"""attn_implementation="mkfast" in a tiny Llama: logits, gradients and greedy generation vs eager."""

from __future__ import annotations

import pytest
import torch

import mkfast

transformers = pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402
from hf_models import assert_greedy_equal_up_to_near_ties  # noqa: E402

from mkfast.layers import attention as attention_layer  # noqa: E402
from mkfast.layers.attention import document_ids_from_position_ids, register_transformers_attention  # noqa: E402

TINY_LLAMA = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def models():
    """The same weights under "mkfast" and "eager" attention, fp32."""
    assert register_transformers_attention()
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, attn_implementation="eager"))
    ours = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, attn_implementation="mkfast"))
    ours.load_state_dict(eager.state_dict())
    return ours.eval(), eager.eval()


@pytest.fixture
def calls(monkeypatch):
    """Counts of the mkfast ops the attention function routed to."""
    counts = {"attention": 0, "decode_attention": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention_layer, "attention", counting("attention", attention_layer.attention))
    monkeypatch.setattr(attention_layer, "decode_attention",
                        counting("decode_attention", attention_layer.decode_attention))
    return counts


def test_logits_match_eager(models, calls):
    ours, eager = models
    input_ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad(), mkfast.use_backend("triton"):
        logits = ours(input_ids, use_cache=False).logits
    assert calls["attention"] == 2  # one per layer: our kernel ran, not a fallback
    assert_close(logits, eager(input_ids, use_cache=False).logits.detach())


def test_greedy_generation_with_kv_cache_matches_eager(models, calls):
    ours, eager = models
    prompt = torch.randint(1, 97, (2, 10))
    settings = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt),
                "pad_token_id": 0}
    with torch.no_grad(), mkfast.use_backend("triton"):
        generated = ours.generate(prompt, **settings)
    expected = eager.generate(prompt, **settings)
    assert torch.equal(generated, expected)
    # Prefill through the main kernel, the 5 later steps through the decode kernel.
    assert calls["attention"] == 2 and calls["decode_attention"] == 2 * 5


def test_packed_documents_match_eager_packing_forward_and_backward(models, calls):
    # RA-CM3 packing: three documents in one row; eager builds the same mask from position ids.
    ours, eager = models
    input_ids = torch.randint(0, 97, (2, 37))
    position_ids = torch.cat([torch.arange(12), torch.arange(1), torch.arange(24)]).expand(2, -1)
    document_ids = document_ids_from_position_ids(position_ids)
    assert document_ids[0].tolist() == [0] * 12 + [1] + [2] * 24
    with mkfast.use_backend("triton"):
        result = ours(input_ids, position_ids=position_ids, document_ids=document_ids, labels=input_ids,
                      use_cache=False)
        result.loss.backward()
    expected = eager(input_ids, position_ids=position_ids, labels=input_ids, use_cache=False)
    expected.loss.backward()
    assert calls["attention"] == 2
    assert_close(result.logits, expected.logits)
    for (name, parameter), wanted in zip(ours.named_parameters(), eager.parameters(), strict=True):
        assert_close(parameter.grad, wanted.grad, message=name)
    ours.zero_grad()
    eager.zero_grad()


def test_padding_runs_through_the_kernels_document_masks(models, calls):
    """Left and right padding become documents of the kernel's own masking (no SDPA fallback)."""
    ours, eager = models
    input_ids = torch.randint(0, 97, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, 9:] = 0  # right padding
    with torch.no_grad(), mkfast.use_backend("triton"):
        logits = ours(input_ids, attention_mask=attention_mask, use_cache=False).logits
    expected = eager(input_ids, attention_mask=attention_mask, use_cache=False).logits.detach()
    assert calls["attention"] == 2
    assert_close(logits[attention_mask.bool()], expected[attention_mask.bool()])


def test_attention_dropout_is_refused():
    module = torch.nn.Module()
    query = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="dropout"):
        attention_layer.mkfast_attention_forward(module, query, query, query, None, dropout=0.1)


@pytest.mark.cuda
def test_cuda_logits_generation_and_training_step_match_sdpa():
    assert register_transformers_attention()
    torch.manual_seed(0)
    config = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512}  # head dim 64, GQA 4:2
    sdpa, ours = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation=name))
                  .cuda() for name in ("sdpa", "mkfast"))
    ours.load_state_dict(sdpa.state_dict())
    input_ids = torch.randint(1, 97, (2, 300), device="cuda")
    with torch.no_grad():
        assert_close(ours(input_ids, use_cache=False).logits, sdpa(input_ids, use_cache=False).logits,
                     dtype=torch.float32, scale=10.0)  # fp32 Triton vs cuBLAS/SDPA summation order
        settings = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(input_ids),
                    "pad_token_id": 0}
        generated = ours.generate(input_ids, **settings)
        expected = sdpa.generate(input_ids, **settings)
    assert_greedy_equal_up_to_near_ties(sdpa, input_ids, generated, expected)
    ours, sdpa = ours.to(torch.bfloat16), sdpa.to(torch.bfloat16)
    ours_loss = ours(input_ids, labels=input_ids, use_cache=False).loss
    sdpa_loss = sdpa(input_ids, labels=input_ids, use_cache=False).loss
    ours_loss.backward()
    sdpa_loss.backward()
    assert_close(ours_loss, sdpa_loss, dtype=torch.bfloat16)
    assert_close(ours.model.layers[0].self_attn.q_proj.weight.grad,
                 sdpa.model.layers[0].self_attn.q_proj.weight.grad,
                 dtype=torch.bfloat16, scale=5.0)  # bf16 gradients through two layers


def test_under_autocast_a_llama_trains_through_the_op_in_the_autocast_dtype(models, monkeypatch):
    """bf16 projections meet fp32 RoPE tables: q, k arrive fp32 and v bf16; the op casts all
    three to the autocast dtype as SDPA does (before, use_cache=False raised on the mix)."""
    ours, eager = models
    input_ids = torch.randint(0, 97, (2, 37))
    seen = []

    def recording(q, k, v, **kwargs):
        out = mkfast.ops.attention(q, k, v, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(attention_layer, "attention", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_loss = ours(input_ids, labels=input_ids, use_cache=False).loss
        eager_loss = eager(input_ids, labels=input_ids, use_cache=False).loss
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert_close(ours_loss, eager_loss.detach(), dtype=torch.bfloat16)
    ours_loss.backward()
    assert ours.model.layers[0].self_attn.q_proj.weight.grad is not None
    ours.zero_grad(set_to_none=True)
