"""attention + decode_attention: ours vs SDPA, FlexAttention, flash-attn (when installed), the reference.

    python -m benchmarks.bench_attention [--quick]

Training cases: B*S = 16k tokens, S in {1024, 2048, 4096},
D in {64, 128} (H*D = 2048), masks "causal" and "3-documents" (three packed
documents of unequal length, RA-CM3's 4096-token rows), forward and
forward+backward. Decode cases: batch 1..64 over a full 4096-token cache.

FLOPs are counted as the flash-attention benchmarks do, the same for every
provider: 4*B*S^2*H*D forward, halved when causal, backward 2.5x forward. The
3-document rows are charged the same (causal) FLOPs as dense causal rows, so
their TFLOP/s is "causal-equivalent" and its ratio to the causal row is the
speed-up from skipping blocks. Decode rates count one read of the K and V cache
(plus q and out) in GB/s.

FlexAttention (torch.nn.attention.flex_attention, compiled, its block mask built
once per case outside the timing) is the library a user would pick for document
masks: on a GPU forward and forward+backward, on a CPU its forward only (its CPU
path has no backward).

On a CPU the Triton kernels would run in the interpreter, which is not a
benchmark: CPU runs time the reference and SDPA only, at small sizes.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import mkfast
from mkfast.ops.attention import (
    attention_allowed_mask,
    attention_reference,
    decode_attention_reference,
    decode_attention_workspace,
)

from .common import Measurement, command_line, cpu_threads, measure, peak_memory_mb, resolve_device, run_suite

TOKENS_PER_BATCH = 16 * 1024  # B*S of every training case (docs/performance.md)
MODEL_WIDTH = 2048  # H*D: 32 heads of 64 or 16 heads of 128
# Three documents of unequal length per row, in fractions of S (a retrieved
# image document, a short text one, the main document).
DOCUMENT_FRACTIONS = (0.25, 0.125, 0.625)
DECODE_CACHE_LENGTH = 4096
DECODE_BATCHES = (1, 8, 16, 32, 64)
DECODE_HEADS, DECODE_HEAD_DIM = 16, 128
# main(cases="target"): the performance targets' shapes (S=4096, D=128, causal / 3 documents, fwd and fwd+bwd;
# decode over a 4096-token cache); cases="tiny": a dry run's smallest shapes. (B, S, D, dtype) rows,
# then (cache length, decode batches).
TARGET_TRAINING, TARGET_DECODE = [(TOKENS_PER_BATCH // 4096, 4096, 128, torch.bfloat16)], (4096, (1, 16, 64))
TINY_TRAINING, TINY_DECODE = [(1, 128, 64, torch.float32)], (128, (1,))


def setup(batch, heads, seq, head_dim, mask, dtype, device, requires_grad=False):
    """q, k, v (B, H, S, D), grad_out, and document_ids (B, S) or None: shared by every provider."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    tensors = [torch.randn(batch, heads, seq, head_dim, generator=generator).to(device=device, dtype=dtype)
               for _ in range(4)]
    q, k, v, grad_out = tensors
    for tensor in (q, k, v):
        tensor.requires_grad_(requires_grad)
    document_ids = None
    if mask == "3-documents":
        lengths = [int(fraction * seq) for fraction in DOCUMENT_FRACTIONS[:-1]]
        lengths.append(seq - sum(lengths))
        ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
        document_ids = ids.to(device=device, dtype=torch.int32).expand(batch, -1).contiguous()
    return q, k, v, grad_out, document_ids


def attention_flops(batch, heads, seq, head_dim, backward: bool) -> float:
    forward = 4 * batch * seq * seq * heads * head_dim / 2  # causal (and 3-document: causal-equivalent)
    return forward * (3.5 if backward else 1.0)


def training_providers(q, k, v, document_ids, device, backward: bool = False, flex: bool = True):
    """name -> forward function; every one computes the same masked attention."""
    # mkfast's auto backend: the Triton kernels on CUDA, ATen's CPU flash attention on CPU.
    providers = {"mkfast": lambda: mkfast.ops.attention(q, k, v, causal=True, document_ids=document_ids)}
    if document_ids is None:
        # SDPA picks its flash / cuDNN backend for is_causal without a mask.
        providers["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = attention_allowed_mask(q.shape[2], k.shape[2], True, document_ids, q.device)
        providers["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if q.shape[2] <= 2048 or device.type == "cpu":
        # The reference materialises (B, H, S, S) fp32 scores: skipped where that is GBs.
        providers["reference"] = lambda: attention_reference(q, k, v, causal=True, document_ids=document_ids)
    if flex and (device.type == "cuda" or not backward):
        providers["flex-attention"] = _flex_attention_provider(q, k, v, document_ids)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        providers["flash-attn"] = _flash_attn_provider(q, k, v, document_ids)
    return providers


_COMPILED_FLEX = []


def _flex_attention_provider(q, k, v, document_ids):
    """Compiled FlexAttention with a block mask for causal (+ documents), built once here."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _COMPILED_FLEX:  # one compiled function: torch.compile caches a graph per shape
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    if document_ids is None:
        def mask_mod(batch, head, query, key):
            return query >= key
    else:
        def mask_mod(batch, head, query, key):
            return (query >= key) & (document_ids[batch, query] == document_ids[batch, key])
    batch, _, seq, _ = q.shape
    block_mask = create_block_mask(mask_mod, batch, None, seq, seq, device=q.device)
    compiled = _COMPILED_FLEX[0]
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _flash_attn_provider(q, k, v, document_ids):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    batch, heads, seq, head_dim = q.shape
    q_t, k_t, v_t = (tensor.transpose(1, 2) for tensor in (q, k, v))  # flash-attn wants (B, S, H, D)
    if document_ids is None:
        return lambda: flash_attn_func(q_t, k_t, v_t, causal=True)
    # Packed documents as varlen sequences: cumulative lengths over all rows.
    lengths = torch.unique_consecutive(document_ids.flatten() + seq * torch.arange(batch, device=q.device)
                                       .repeat_interleave(seq), return_counts=True)[1]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    flat = [tensor.reshape(batch * seq, heads, head_dim) for tensor in (q_t, k_t, v_t)]
    return lambda: flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, longest, longest, causal=True)


def _with_backward(forward, inputs, grad_out):
    def run():
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        grad = grad_out if out.shape == grad_out.shape else grad_out.transpose(1, 2)
        torch.autograd.grad(out, inputs, grad.reshape(out.shape))
    return run


def training_cases(quick: bool, device: torch.device, cases: str = "default"):
    if cases != "default":
        return TARGET_TRAINING if cases == "target" else TINY_TRAINING
    if device.type == "cpu":
        # CPU: one small shape, fp32 (CPU SDPA's fast paths are fp32).
        small = [(4, 256, 64, torch.float32)]
        return small if quick else small + [(2, 512, 64, torch.float32)]
    seqs = (1024, 4096) if quick else (1024, 2048, 4096)
    return [(TOKENS_PER_BATCH // seq, seq, head_dim, torch.bfloat16)
            for seq in seqs for head_dim in (64, 128)]


def decode_providers(q, k_cache, v_cache, lengths, device):
    """name -> function; q (B, H, 1, D) over full (B, H, L, D) caches."""
    providers = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k_cache, v_cache),
        "reference": lambda: decode_attention_reference(q, k_cache, v_cache, lengths),
    }
    if device.type == "cuda":
        # The serving path: one workspace and output for every step (one launch, no allocation).
        workspace, out = decode_attention_workspace(q, k_cache), torch.empty_like(q)
        step = dict(check_lengths=False, workspace=workspace, out=out)
        providers["mkfast"] = lambda: mkfast.ops.decode_attention(q, k_cache, v_cache, lengths, **step)
        if importlib.util.find_spec("flash_attn") is not None:
            from flash_attn import flash_attn_with_kvcache

            q_t, k_t, v_t = (tensor.transpose(1, 2) for tensor in (q, k_cache, v_cache))
            providers["flash-attn"] = lambda: flash_attn_with_kvcache(q_t, k_t, v_t, cache_seqlens=lengths)
    return providers


def decode_measurements(quick: bool, device: torch.device, repetitions: int,
                        cases: str = "default") -> list[Measurement]:
    measurements = []
    cache_length = DECODE_CACHE_LENGTH if device.type == "cuda" else 1024
    batches = DECODE_BATCHES if device.type == "cuda" else (1, 8)
    if cases != "default":
        cache_length, batches = TARGET_DECODE if cases == "target" else TINY_DECODE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for batch in batches[:2] if quick else batches:
        q, k_cache, v_cache, _, _ = setup(batch, DECODE_HEADS, cache_length, DECODE_HEAD_DIM, "causal", dtype,
                                          device)
        q = q[:, :, :1].contiguous()
        lengths = torch.full((batch,), cache_length, dtype=torch.int32, device=device)
        element = q.element_size()
        bytes_moved = element * (2 * k_cache.numel() + 2 * q.numel())
        case = {"mode": "decode", "B": batch, "H": DECODE_HEADS, "L": cache_length, "D": DECODE_HEAD_DIM}
        providers = decode_providers(q, k_cache, v_cache, lengths, device)
        for provider, fn in providers.items():
            timings = measure(fn, device, warmup=2, repetitions=repetitions)
            measurements.append(Measurement(case, provider, timings, work={"gbps": bytes_moved},
                                            peak_memory_mb=peak_memory_mb(fn, device)))
            print(f"{case} {provider}: {measurements[-1].median_ms:.3f} ms", flush=True)
    return measurements


def training_measurements(quick: bool, device: torch.device, repetitions: int,
                          cases: str = "default") -> list[Measurement]:
    measurements = []
    for batch, seq, head_dim, dtype in training_cases(quick, device, cases):
        heads = MODEL_WIDTH // head_dim if device.type == "cuda" else 4
        for mask in ("causal", "3-documents"):
            for backward in (False, True):
                q, k, v, grad_out, document_ids = setup(batch, heads, seq, head_dim, mask, dtype, device,
                                                        requires_grad=backward)
                case = {"mode": "fwd+bwd" if backward else "fwd", "mask": mask, "B": batch, "H": heads,
                        "S": seq, "D": head_dim}
                work = {"tflops": attention_flops(batch, heads, seq, head_dim, backward)}
                # A dry run (tiny cases) skips FlexAttention: compiling it takes minutes on 2 CPU cores.
                providers = training_providers(q, k, v, document_ids, device, backward, flex=cases != "tiny")
                for provider, forward in providers.items():
                    fn = _with_backward(forward, (q, k, v), grad_out) if backward else forward
                    with torch.no_grad() if not backward else torch.enable_grad():
                        timings = measure(fn, device, warmup=2, repetitions=repetitions)
                        memory = peak_memory_mb(fn, device)
                    measurements.append(Measurement(case, provider, timings, work=work,
                                                    peak_memory_mb=memory))
                    print(f"{case} {provider}: {measurements[-1].median_ms:.3f} ms", flush=True)
    return measurements


def main(quick: bool = False, device: str | None = None, output_root: str | None = None,
         cases: str = "default") -> None:
    device = resolve_device(device)
    repetitions = 3 if quick or cases == "tiny" else (5 if device.type == "cpu" else 20)
    with cpu_threads(device, 1):  # see benchmarks.common.cpu_threads
        measurements = training_measurements(quick, device, repetitions, cases)
        measurements += decode_measurements(quick, device, repetitions, cases)
    notes = ("bf16 on GPU, fp32 on CPU (one torch thread). TFLOP/s: 4*B*S^2*H*D forward, halved for "
             "causal, x3.5 for fwd+bwd; 3-document rows are charged the causal FLOPs (causal-equivalent "
             "rate). Decode GB/s: one read of the K and V cache. sdpa = F.scaled_dot_product_attention "
             "(is_causal without a mask; attn_mask for "
             "documents); flex-attention = compiled FlexAttention with a causal (+ document) block mask, "
             "forward only on CPU. Ratio to any peer: its median ms over mkfast's. ")
    if device.type == "cpu":
        notes += ("CPU run, small shapes: 'mkfast' is the op's cpu backend (ATen's CPU flash attention, "
                  "with an additive mask for documents); the Triton kernels only run on CPU under the "
                  "interpreter, which is not a benchmark. Decode on CPU: reference vs SDPA only.")
    run_suite("attention", measurements, device, baseline="sdpa", notes=notes, output_root=output_root)


if __name__ == "__main__":
    command_line(main, __doc__)
