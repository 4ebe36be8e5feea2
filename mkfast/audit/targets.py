"""The shapes the audit compiles for: the benchmarks' GPU targets, bf16, on fake CUDA tensors.

Each target calls the op's Triton backend (what the op dispatches to on a GPU; the
attention backward's launcher directly) with tensors of the target's shapes;
``triton_static.record`` turns their launches into sm_90a compiles. Shapes only: the tensors hold no data.

  attention  B*S = 16K tokens at S = 4096 (B = 4), model width 2048 (32 heads of 64 or
             16 of 128), GQA group 4, causal and causal with 3 documents (the launcher
             picks its dK/dV tile by mask), forward + backward;
  decode     B = 1..64, 32 query / 8 key-value heads, D = 128, cache 4096, one new token;
  mome       Llama-2-7B MLP (hidden 4096, intermediate 11008), visual memory 1024, rank 8,
             8192 tokens, forward + backward;
  topk       N = 1e7 rows of d = 768, b = 1 / 64 / 256 queries, k = 8 (pool 32) and the
             widened pool 128 the launcher moves to when a pool comes up short.
Two more targets exist for the 64-bit offset rule: the same kernels at a batch where a
tensor spans 1.5 x 2^31 elements (the KV cache at B = 192, Hkv = 32, L = 4096, D = 128;
q at B = 192, Hq = 32, S = 4096, D = 128). They are launches like the others, held to
every rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

DTYPE = torch.bfloat16
CUDA = "cuda"
SEQUENCE, TOKENS_PER_BATCH, MODEL_WIDTH, GQA_GROUP = 4096, 16 * 1024, 2048, 4
DOCUMENT_FRACTIONS = (0.25, 0.125, 0.625)
DECODE_BATCHES, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM, CACHE = (1, 8, 16, 32, 64), 32, 8, 128, 4096
MOME = dict(tokens=8192, hidden=4096, intermediate=11008, visual=1024, rank=8)
TOPK_ROWS, TOPK_DIM, TOPK_BATCHES, TOPK_K = 10_000_000, 768, (1, 64, 256), 8
# The pool the launcher widens to after a short pool of 2k + 16 = 32: 4x, as k = 56 starts at.
TOPK_WIDENED_POOL_K = 56
REACH_BATCH = 192


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    group: str  # what --kernels selects: attention, decode, mome, topk
    launch: Callable[[], None]


def _empty(*shape, dtype=DTYPE):
    return torch.empty(shape, dtype=dtype, device=CUDA)


def _attention(batch: int, head_dim: int, documents: bool, heads: int | None = None) -> Callable[[], None]:
    def launch():
        from mkfast.kernels.attention import attention_backward
        from mkfast.ops.attention import attention_backends

        attention_forward = attention_backends.backends["triton"].implementation

        query_heads = heads or MODEL_WIDTH // head_dim
        q = _empty(batch, query_heads, SEQUENCE, head_dim)
        k, v = (_empty(batch, query_heads // GQA_GROUP, SEQUENCE, head_dim) for _ in range(2))
        # Values unused: the document spans are shapes here. None is plain causal attention.
        document_ids = _empty(batch, SEQUENCE, dtype=torch.int32) if documents else None
        out, lse = attention_forward(q, k, v, True, document_ids, head_dim**-0.5)
        attention_backward(torch.empty_like(out), q, k, v, out, lse, True, document_ids, head_dim**-0.5)

    return launch


def _decode(batch: int, kv_heads: int = DECODE_KV_HEADS) -> Callable[[], None]:
    def launch():
        from mkfast.ops.attention import decode_attention_backends

        decode_attention_forward = decode_attention_backends.backends["triton"].implementation

        q = _empty(batch, DECODE_HEADS, 1, DECODE_HEAD_DIM)
        k_cache, v_cache = (_empty(batch, kv_heads, CACHE, DECODE_HEAD_DIM) for _ in range(2))
        lengths = _empty(batch, dtype=torch.int32)
        decode_attention_forward(q, k_cache, v_cache, lengths, DECODE_HEAD_DIM**-0.5)

    return launch


def _mome() -> None:
    from torch import nn
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from mkfast.layers.mome import MoMEFFN
    from mkfast.layers.visual_memory import RMSNorm, VisualMemory
    from mkfast.ops import mome, mome_fused

    class LlamaMLP(nn.Module):
        def __init__(self, hidden, intermediate):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
            self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    hidden, rank = MOME["hidden"], MOME["rank"]
    # Built for real on the meta device (Module.to cannot move fake tensors), then each weight
    # is stood in for by a fake CUDA tensor of its shape, strides and dtype.
    with unset_fake_temporarily(), torch.device("meta"):
        memory = VisualMemory(hidden, ratio=MOME["visual"] / hidden)
        layer = MoMEFFN(
            LlamaMLP(hidden, MOME["intermediate"]), memory, RMSNorm(hidden), rank=rank, alpha=2 * rank
        )
        layer = layer.to(DTYPE)
        weights = layer.mome_weights()
    weights = dataclasses.replace(
        weights,
        **{
            field.name: torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=CUDA)
            for field in dataclasses.fields(weights)
            if isinstance(value := getattr(weights, field.name), torch.Tensor)
        },
    )
    x = _empty(MOME["tokens"], hidden)
    output, residuals = mome.mome_backends.backends["triton"].implementation(x, weights)
    mome_fused.fused_backward("triton", torch.empty_like(output), x, weights, residuals)


def _topk(batch: int, k: int) -> Callable[[], None]:
    def launch():
        from mkfast.ops.topk_dedup import topk_dedup_backends

        queries, memory = _empty(batch, TOPK_DIM), _empty(TOPK_ROWS, TOPK_DIM)
        topk_dedup_backends.backends["triton"].implementation(queries, memory, k, 0.9, None)

    return launch


def targets() -> list[Target]:
    found = [
        Target(
            f"attention D={d} S={SEQUENCE} {mask}",
            "attention",
            _attention(TOKENS_PER_BATCH // SEQUENCE, d, mask == "3 documents"),
        )
        for d in (64, 128)
        for mask in ("causal", "3 documents")
    ]
    found.append(
        Target(
            f"attention D=128 B={REACH_BATCH} Hq=32 (q > 2^31 elements)",
            "attention",
            _attention(REACH_BATCH, 128, True, 32),
        )
    )
    found += [Target(f"decode B={batch}", "decode", _decode(batch)) for batch in DECODE_BATCHES]
    found.append(
        Target(f"decode B={REACH_BATCH} Hkv=32 (cache > 2^31 elements)", "decode", _decode(REACH_BATCH, 32))
    )
    found.append(Target("mome tokens=8192", "mome", _mome))
    found += [Target(f"topk b={batch} k={TOPK_K}", "topk", _topk(batch, TOPK_K)) for batch in TOPK_BATCHES]
    found += [
        Target(f"topk b={batch} pool 128", "topk", _topk(batch, TOPK_WIDENED_POOL_K))
        for batch in TOPK_BATCHES
    ]
    return found


GROUPS = ("attention", "decode", "mome", "topk", "cuda")
