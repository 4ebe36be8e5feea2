"""attention: causal / document-masked multi-head attention with GQA, for RA-CM3's packed sequences.

RA-CM3 (SPEC.md, "Documents", "Generator") trains on 4096-token sequences that
hold up to 3 documents (retrieved documents prepended to the main one). With
``document_ids`` a token attends only to tokens of its own document, and, when
``causal``, only to earlier or equal positions.

Semantics, kept by every backend:
  out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // G, j] + mask) @ v[b, h // G]
  with G = Hq / Hkv, scale = 1/sqrt(D) by default, and key j allowed for query i iff
    - causal: j <= i + (S_kv - S_q)      (queries are the last S_q positions of the keys)
    - document_ids: document_ids[b, i] == document_ids[b, j]   (needs S_q == S_kv)
  Every query sees at least one key (itself), so no row is empty.
  Computation in fp32 whatever the input dtype; the output has the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mkfast.backend import OpDispatcher, triton_unavailable_reason
from mkfast.ops._checks import (
    FLOAT_DTYPES,
    check_finite_float,
    check_int32_values,
    check_no_grad,
    check_same_size,
    check_tensor,
    has_values,
)

OP = "attention"
INTEGER_DTYPES = (torch.int32, torch.int64)

attention_backends = OpDispatcher(OP, auto_order={"cuda": ("triton", "reference"),
                                                  "cpu": ("cpu", "reference")})


# --------------------------------------------------------------------------- reference
def attention_allowed_mask(
    query_length: int,
    key_length: int,
    causal: bool,
    document_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The boolean mask every backend implements: (B or 1, 1, S_q, S_kv), True = may attend."""
    allowed = torch.ones(1, 1, query_length, key_length, dtype=torch.bool, device=device)
    if causal:
        offset = key_length - query_length  # queries are the last S_q key positions
        query_positions = torch.arange(query_length, device=device)[:, None] + offset
        allowed = allowed & (torch.arange(key_length, device=device)[None, :] <= query_positions)
    if document_ids is not None:
        same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, S, S)
        allowed = allowed & same_document[:, None]
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition of the op: SDPA with the equivalent boolean mask, in fp32.

    q: (B, Hq, S_q, D), k and v: (B, Hkv, S_kv, D), document_ids: (B, S) or None.
    Returns (B, Hq, S_q, D) in q's dtype. Differentiable with plain autograd.
    """
    group = q.shape[1] // k.shape[1]
    mask = attention_allowed_mask(q.shape[2], k.shape[2], causal, document_ids, q.device)
    out = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1),
        attn_mask=mask, scale=scale,
    )
    return out.to(q.dtype).contiguous()


@attention_backends.register("reference")
def _attention_reference_forward(q, k, v, causal, document_ids, scale):
    """Reference forward for the custom op: output and per-row log-sum-exp (B, Hq, S_q) fp32."""
    out = attention_reference(q, k, v, causal=causal, document_ids=document_ids, scale=scale)
    group = q.shape[1] // k.shape[1]
    scores = scale * q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2)
    mask = attention_allowed_mask(q.shape[2], k.shape[2], causal, document_ids, q.device)
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return out, lse


def _attention_reference_backward(grad_out, q, k, v, out, lse, causal, document_ids, scale):
    """Gradients of the reference: P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * O)).

    Written out (not autograd) because a custom op's implementation runs below
    the autograd dispatcher. Returns dq, dk, dv in the dtypes of q, k, v.
    """
    group = q.shape[1] // k.shape[1]
    q32, k32, v32 = q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    grad32 = grad_out.float()
    mask = attention_allowed_mask(q.shape[2], k.shape[2], causal, document_ids, q.device)
    probabilities = torch.exp(scale * q32 @ k32.transpose(-1, -2) - lse[..., None]).masked_fill(~mask, 0.0)
    grad_v = probabilities.transpose(-1, -2) @ grad32
    row_dot = (grad32 * out.float()).sum(-1, keepdim=True)
    grad_scores = probabilities * (grad32 @ v32.transpose(-1, -2) - row_dot)
    grad_q = scale * grad_scores @ k32
    grad_k = scale * grad_scores.transpose(-1, -2) @ q32
    batch, heads_kv = k.shape[0], k.shape[1]
    # GQA: a key/value head's gradient sums over the query heads of its group.
    grad_k = grad_k.view(batch, heads_kv, group, *grad_k.shape[2:]).sum(2)
    grad_v = grad_v.view(batch, heads_kv, group, *grad_v.shape[2:]).sum(2)
    return grad_q.to(q.dtype).contiguous(), grad_k.to(k.dtype).contiguous(), grad_v.to(v.dtype).contiguous()


# --------------------------------------------------------------------------- cpu backend
# ATen's blockwise CPU flash attention (what SDPA runs on CPU): it returns the log-sum-exp
# the custom op saves and has its own backward, so neither direction materialises the
# (S_q, S_kv) fp32 score matrix that the reference builds twice.
def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "ATen's CPU flash attention runs on CPU tensors only"


def _cpu_mask(q, k, causal, document_ids, scale) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, additive mask) for ATen, whose is_causal puts queries at the first keys, not the last.

    NaN in q or k takes the masked path: without a mask ATen's kernel turns a NaN query row into
    zeros (and leaves rows before a NaN key finite), hiding the NaN the reference propagates. The
    check is one read of q and k, small next to the O(S^2) attention. So does a scale <= 0: ATen's
    is_causal then returns NaN (it scales the masked scores).
    """
    has_nan = bool(torch.isnan(q).any()) or bool(torch.isnan(k).any())
    plain = document_ids is None and (not causal or (q.shape[2] == k.shape[2] and scale > 0))
    if plain and not has_nan:
        return causal, None
    allowed = attention_allowed_mask(q.shape[2], k.shape[2], causal, document_ids, q.device)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    return False, bias.masked_fill(~allowed, float("-inf"))


def _expand_heads(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """GQA: each key/value head repeated for the ``group`` query heads that share it (no copy when 1)."""
    return tensor if group == 1 else tensor.repeat_interleave(group, dim=1)


@attention_backends.register("cpu", _cpu_only)
def _attention_cpu_forward(q, k, v, causal, document_ids, scale):
    group = q.shape[1] // k.shape[1]
    is_causal, mask = _cpu_mask(q, k, causal, document_ids, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_heads(k, group), _expand_heads(v, group), 0.0, is_causal, attn_mask=mask, scale=scale)
    return out.contiguous(), lse.float().contiguous()


def _attention_cpu_backward(grad_out, q, k, v, out, lse, causal, document_ids, scale):
    group = q.shape[1] // k.shape[1]
    is_causal, mask = _cpu_mask(q, k, causal, document_ids, scale)
    grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, _expand_heads(k, group), _expand_heads(v, group), out, lse, 0.0, is_causal,
        attn_mask=mask, scale=scale)
    if group > 1:  # GQA: a key/value head's gradient sums over the query heads of its group
        batch, heads_kv = k.shape[0], k.shape[1]
        grad_k = grad_k.view(batch, heads_kv, group, *grad_k.shape[2:]).sum(2)
        grad_v = grad_v.view(batch, heads_kv, group, *grad_v.shape[2:]).sum(2)
    return grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous()


# --------------------------------------------------------------------------- triton backend
# A CUDA grid holds 2^31 - 1 programs on axis 0 and 65535 on axes 1 and 2. The attention kernels
# put (batch, head) on axis 0 and their query or key blocks on axis 1; decode puts (batch, kv head)
# on axis 0 and its splits on axis 1. The interpreter is held to them too, so that CPU runs
# refuse what a GPU would.
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _check_triton_grid(op: str, axes: dict[int, tuple[str, int]]) -> None:
    """Refuse a launch with more programs on a grid axis than CUDA allows (on a GPU the launch
    would fail with an unnamed "invalid argument"). axes: grid axis -> (what one program covers,
    in the arguments' names; programs)."""
    for axis, (what, programs) in axes.items():
        if programs > CUDA_GRID_LIMITS[axis]:
            raise ValueError(f"{op}: the triton backend launches one program per {what} on CUDA grid axis "
                             f"{axis}, which holds at most {CUDA_GRID_LIMITS[axis]}, got {programs}; "
                             "split the batch, heads or sequence")


def _check_attention_grids(q, k, document_ids, backward: bool) -> None:
    """The grids of kernels/attention.py's launches: (batch * heads, blocks of the sequence)."""
    from mkfast.kernels import attention as kernels

    batch, heads, query_length, head_dim = q.shape
    kv_heads, key_length = k.shape[1], k.shape[2]

    def block_of(table, index):
        return kernels._config(table, head_dim, q.device, q.dtype)[index]

    def grid(name, head_name, num_heads, block, length):
        return {0: (f"(batch, head) of {name} (B * {head_name} = {batch} * {num_heads})", batch * num_heads),
                1: (f"{block} positions of {name} (S={length})", -(-length // block))}

    if not backward:
        _check_triton_grid(OP, grid("q", "Hq", heads, block_of(kernels.FORWARD_CONFIGS, 0), query_length))
        return
    # The delta pass and dQ step through the queries, dK/dV through the keys.
    query_block = min(kernels.DELTA_BLOCK_M, block_of(kernels.BACKWARD_DQ_CONFIGS, 0))
    key_table = (kernels.BACKWARD_DKDV_CONFIGS if document_ids is None
                 else kernels.BACKWARD_DKDV_DOCUMENT_CONFIGS)
    _check_triton_grid(OP, grid("q", "Hq", heads, query_block, query_length))
    _check_triton_grid(OP, grid("k", "Hkv", kv_heads, block_of(key_table, 1), key_length))


@attention_backends.register("triton", triton_unavailable_reason)
def _attention_triton_forward(q, k, v, causal, document_ids, scale):
    from mkfast.kernels.attention import attention_forward

    _check_attention_grids(q, k, document_ids, backward=False)
    return attention_forward(q, k, v, causal, document_ids, scale)


def _attention_triton_backward(grad_out, q, k, v, out, lse, causal, document_ids, scale):
    from mkfast.kernels.attention import attention_backward

    _check_attention_grids(q, k, document_ids, backward=True)
    return attention_backward(grad_out, q, k, v, out, lse, causal, document_ids, scale)


_BACKWARDS = {"reference": _attention_reference_backward, "cpu": _attention_cpu_backward,
              "triton": _attention_triton_backward}


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mkfast::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
    document_ids: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = attention_backends.select(q.device)
    return backend.implementation(q, k, v, causal, document_ids, scale)


@_attention_op.register_fake
def _(q, k, v, causal, document_ids, scale):
    batch, heads, query_length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, query_length), dtype=torch.float32)


@torch.library.custom_op("mkfast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, document_ids: torch.Tensor | None, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARDS[backend](grad_out.contiguous(), q, k, v, out, lse, causal, document_ids, scale)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, document_ids, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, document_ids, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids)
    ctx.causal, ctx.scale = causal, scale
    # Backward may run on an autograd thread without the caller's use_backend
    # context: remember the backend the forward used, here on the caller's thread.
    ctx.backend = attention_backends.select(q.device).name


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, document_ids = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward_op(
        grad_out, q, k, v, out, lse, ctx.causal, document_ids, ctx.scale, ctx.backend
    )
    return grad_q, grad_k, grad_v, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function
def _check_query_key_value(op: str, q, k, v, *, q_layout: str, kv_layout: str, kv_shape: str,
                           names: tuple[str, str] = ("k", "v")) -> None:
    """What attention and decode_attention both check: q (B, Hq, *, D) in a float dtype; k and v of
    one shape (B, Hkv, *, D), in q's dtype and on its device; Hq a multiple of Hkv; D in 1..256."""
    k_name, v_name = names
    check_tensor(op, "q", q, ndim=4, layout=q_layout, dtypes=FLOAT_DTYPES)
    check_tensor(op, k_name, k, ndim=4, layout=kv_layout, dtypes=(q.dtype,), device=q.device)
    check_tensor(op, v_name, v, ndim=4, layout=kv_layout, dtypes=(q.dtype,), device=q.device)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {k_name} and {v_name} must have the same shape {kv_shape}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    check_same_size(op, "batch size (dim 0) like q's", q.shape[0], k_name, k.shape[0])
    check_same_size(op, "head dim (dim 3) like q's", q.shape[3], k_name, k.shape[3])
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{op}: q's heads ({q.shape[1]}) must be a multiple of "
                         f"{k_name}'s heads ({k.shape[1]}) (GQA)")
    if q.shape[3] == 0 or q.shape[3] > 256:
        raise ValueError(f"{op}: head dim D must be in 1..256, got {q.shape[3]}")


def _validate(q, k, v, causal, document_ids, scale) -> None:
    layout = "(B, H, S, D)"
    _check_query_key_value(OP, q, k, v, q_layout=layout, kv_layout=layout, kv_shape="(B, Hkv, S, D)")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"{OP}: k must have at least as many positions as q (queries are the last ones), "
                         f"got S_kv={k.shape[2]} < S_q={q.shape[2]}")
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: causal must be a bool, got {type(causal).__name__}")
    if document_ids is not None:
        check_tensor(OP, "document_ids", document_ids, ndim=2, layout="(B, S)", dtypes=INTEGER_DTYPES,
                     device=q.device)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{OP}: document_ids needs S_q == S_kv, got S_q={q.shape[2]}, S_kv={k.shape[2]}")
        if tuple(document_ids.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"{OP}: document_ids must be (B, S) = {(q.shape[0], q.shape[2])}, "
                             f"got {tuple(document_ids.shape)}")
    if document_ids is not None:
        check_int32_values(OP, "document_ids", document_ids)
    if scale is not None:
        check_finite_float(OP, "scale", scale)



def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the tensors in its dtype: SDPA is an autocast lower-precision op, and a
    Llama's attention inputs come out mixed there (bf16 projections, then fp32 RoPE tables
    promote q and k back to fp32 while v stays bf16)."""
    if not all(isinstance(tensor, torch.Tensor) and tensor.is_floating_point() for tensor in tensors):
        return tensors  # left for the op's checks to name
    device_type = tensors[0].device.type
    # Meta tensors (shape propagation) have no autocast: they go straight to the fake implementations.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(tensor.to(dtype) for tensor in tensors)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal and/or document-masked attention, forward and backward.

    Args:
        q: (B, Hq, S_q, D) fp32/fp16/bf16. (B, S, H, D) tensors (flash_attn's layout) go to
            ``mkfast.ops.attention_bshd``: shapes cannot tell the layouts apart when
            Hq == Hkv and S_q == S_kv.
        k, v: (B, Hkv, S_kv, D), same dtype and device; Hq a multiple of Hkv
            (GQA/MQA); S_kv >= S_q (a KV cache: queries are the last S_q positions).
        causal: mask keys after each query (aligned to the end when S_kv > S_q).
        document_ids: (B, S) int32/int64 or None; a token attends only to its own
            document. Needs S_q == S_kv. Ids need not be sorted or contiguous
            (sorted ids, as in packing, let the kernels skip the most blocks);
            they must fit in int32 (int64 ids are checked: a device sync on GPU).
        scale: softmax scale (finite), default 1/sqrt(D).

    Returns:
        (B, Hq, S_q, D) in q's dtype; under autocast, q, k and v are first cast to its
        dtype, as SDPA's inputs are.
    """
    q, k, v = autocast_inputs(q, k, v)
    _validate(q, k, v, causal, document_ids, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:  # ATen's CPU kernel divides by 0 heads
        return q * 0.0 + (k.sum() + v.sum()) * 0.0  # empty, but connected to q, k, v for autograd
    out, _ = _attention_op(q, k, v, causal, document_ids, scale)
    return out


# =========================================================================== decode_attention
DECODE_OP = "decode_attention"

decode_attention_backends = OpDispatcher(DECODE_OP, auto_order={"cuda": ("triton", "reference")})


def decode_allowed_mask(cache_seqlens: torch.Tensor, new_tokens: int, cache_length: int) -> torch.Tensor:
    """(B, 1, T, L_max) bool: new token t of row b sees cache positions [0, len_b - T + t]."""
    positions = torch.arange(cache_length, device=cache_seqlens.device)
    last_visible = (cache_seqlens.long()[:, None] - new_tokens
                    + torch.arange(new_tokens, device=cache_seqlens.device))
    return (positions[None, None, :] <= last_visible[:, :, None])[:, None]


@decode_attention_backends.register("reference")
def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition of decode: SDPA over the filled cache with the causal-at-the-end mask, in fp32.

    q: (B, Hq, T, D), k_cache/v_cache: (B, Hkv, L_max, D), cache_seqlens: (B,) -> (B, Hq, T, D).
    """
    group = q.shape[1] // k_cache.shape[1]
    mask = decode_allowed_mask(cache_seqlens, q.shape[2], k_cache.shape[2])
    # Positions at or past a row's length are unwritten (a cache from torch.empty may hold NaN there,
    # and SDPA multiplies masked-out values by 0): read them as zeros, as the kernels never load them.
    positions = torch.arange(k_cache.shape[2], device=q.device)
    filled = (positions < cache_seqlens.long()[:, None])[:, None, :, None]
    k_cache, v_cache = k_cache.float().where(filled, 0.0), v_cache.float().where(filled, 0.0)
    out = F.scaled_dot_product_attention(
        q.float(), k_cache.repeat_interleave(group, dim=1), v_cache.repeat_interleave(group, dim=1),
        attn_mask=mask, scale=scale,
    )
    return out.to(q.dtype).contiguous()


def _check_decode_grid(k_cache: torch.Tensor) -> None:
    """kernels/decode_attention.py launches (batch * kv heads, splits); the splits stay far below
    axis 1's limit (at most two per SM)."""
    batch, kv_heads = k_cache.shape[0], k_cache.shape[1]
    programs = (f"(batch, kv head) of k_cache (B * Hkv = {batch} * {kv_heads})", batch * kv_heads)
    _check_triton_grid(DECODE_OP, {0: programs})


@decode_attention_backends.register("triton", triton_unavailable_reason)
def _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, scale):
    from mkfast.kernels.decode_attention import decode_attention_forward

    _check_decode_grid(k_cache)
    return decode_attention_forward(q, k_cache, v_cache, cache_seqlens, scale)


@torch.library.custom_op("mkfast::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float,
) -> torch.Tensor:
    backend = decode_attention_backends.select(q.device)
    return backend.implementation(q, k_cache, v_cache, cache_seqlens, scale)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("mkfast::decode_attention_into", mutates_args=("workspace", "out"))
def _decode_attention_into_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float,
    workspace: torch.Tensor, out: torch.Tensor,
) -> None:
    """decode_attention into ``out`` through a caller's ``workspace``: on the triton backend one
    launch that allocates nothing and reads nothing back (a CUDA graph can capture it)."""
    backend = decode_attention_backends.select(q.device)
    if backend.name != "triton":  # the reference has no workspace to use
        out.copy_(backend.implementation(q, k_cache, v_cache, cache_seqlens, scale))
        return
    from mkfast.kernels.decode_attention import decode_attention_forward, decode_workspace_elements

    _check_decode_grid(k_cache)
    needed = decode_workspace_elements(q.shape[0], q.shape[1], k_cache.shape[1], q.shape[2], k_cache.shape[2],
                                       q.shape[3], q.device)
    if workspace.numel() < needed:
        raise ValueError(f"{DECODE_OP}: workspace must hold at least {needed} fp32 elements for these shapes "
                         f"(decode_attention_workspace makes one), got {workspace.numel()}")
    decode_attention_forward(q, k_cache, v_cache, cache_seqlens, scale, workspace=workspace, out=out)


def decode_attention_workspace(q: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
    """The zeroed fp32 workspace decode_attention(..., workspace=) needs for q's and k_cache's
    shapes: allocate it once and pass it to every step (each call leaves it reusable)."""
    if triton_unavailable_reason(q.device) is not None:
        return torch.zeros(0, dtype=torch.float32, device=q.device)  # the reference needs none
    from mkfast.kernels.decode_attention import decode_workspace

    return decode_workspace(q, k_cache)


def _validate_decode(q, k_cache, v_cache, cache_seqlens, check_lengths: bool) -> None:
    _check_query_key_value(DECODE_OP, q, k_cache, v_cache, q_layout="(B, Hq, T, D)", kv_layout="(B, H, L, D)",
                           kv_shape="(B, Hkv, L_max, D)", names=("k_cache", "v_cache"))
    check_tensor(DECODE_OP, "cache_seqlens", cache_seqlens, ndim=1, layout="(B,)", dtypes=INTEGER_DTYPES,
                 device=q.device)
    check_same_size(DECODE_OP, "length B like q's batch", q.shape[0], "cache_seqlens", cache_seqlens.shape[0])
    if check_lengths and q.shape[0] and has_values(cache_seqlens):
        # A device sync on GPU: the price of refusing lengths that would read
        # outside the cache or leave a new token with no key (silent garbage).
        shortest, longest = int(cache_seqlens.min()), int(cache_seqlens.max())
        if shortest < q.shape[2] or longest > k_cache.shape[2]:
            raise ValueError(f"{DECODE_OP}: cache_seqlens must be in [T, L_max] = [{q.shape[2]}, "
                             f"{k_cache.shape[2]}] (the T new tokens are already in the cache), "
                             f"got values in [{shortest}, {longest}]")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    check_lengths: bool = True,
    workspace: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of T new tokens per row over a ragged KV cache (inference only: no backward, so
    inputs that require grad are refused while grad mode is on).

    Args:
        q: (B, Hq, T, D) fp32/fp16/bf16, the new tokens' queries.
        k_cache, v_cache: (B, Hkv, L_max, D), Hq a multiple of Hkv; row b is filled
            on [0, cache_seqlens[b]) and the new tokens' own keys are already at
            [cache_seqlens[b] - T, cache_seqlens[b]).
        cache_seqlens: (B,) int32/int64, each in [T, L_max]; positions at or past a row's
            length are never read (they may hold anything, NaN included).
        scale: softmax scale (finite), default 1/sqrt(D).
        check_lengths: check cache_seqlens' values (a device sync on GPU); pass
            False only when they are valid by construction (a full cache).
        workspace: from decode_attention_workspace(q, k_cache), reused across steps; with
            it (and check_lengths=False) the triton backend makes one launch, no host sync
            and, given ``out`` too, no allocation: the step can be captured in a CUDA graph.
        out: (B, Hq, T, D) contiguous, q's dtype, written in place (with a workspace only).

    Returns:
        (B, Hq, T, D) in q's dtype; new token t attends to positions <= len - T + t.
    """
    q, k_cache, v_cache = autocast_inputs(q, k_cache, v_cache)
    _validate_decode(q, k_cache, v_cache, cache_seqlens, check_lengths)
    check_no_grad(DECODE_OP, " (mkfast.ops.attention has a backward)", q=q, k_cache=k_cache, v_cache=v_cache)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_finite_float(DECODE_OP, "scale", scale)
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if workspace is None:
        if out is not None:
            raise ValueError(f"{DECODE_OP}: out is written only with a workspace "
                             "(decode_attention_workspace)")
        return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, scale)
    check_tensor(DECODE_OP, "workspace", workspace, ndim=1, layout="(N,)", dtypes=(torch.float32,),
                 device=q.device)
    if out is None:
        out = q.new_empty(q.shape)
    check_tensor(DECODE_OP, "out", out, ndim=4, layout="(B, Hq, T, D)", dtypes=(q.dtype,), device=q.device)
    if out.shape != q.shape or not out.is_contiguous():
        raise ValueError(f"{DECODE_OP}: out must be contiguous with q's shape {tuple(q.shape)}, got "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    _decode_attention_into_op(q, k_cache, v_cache, cache_seqlens, scale, workspace, out)
    return out
