"""mkfast.ops.attention: every backend against the SDPA reference, forward and backward.

On a CPU machine the Triton kernels run under the interpreter (conftest), so the
shapes stay small; the `cuda` tests cover bf16 and RA-CM3's S=4096.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, devices_to_test, interpreter_dtypes, run_opcheck

import mkfast
from mkfast.ops.attention import attention, attention_reference

# fp16 gradients sum S products of rounded values: twice the output tolerance.
GRADIENT_SCALE = 2.0

# (batch, query heads, kv heads, S, D): S=1, tails (17, 130, 257 are not
# multiples of any block), GQA 4:2, MQA 4:1, and a head dim that is not a power of two.
SHAPES = [
    (1, 2, 2, 1, 64),
    (2, 4, 2, 17, 64),
    (1, 4, 1, 130, 128),
    (1, 1, 1, 257, 32),
    (1, 2, 1, 45, 24),
]


def make_inputs(batch, heads, kv_heads, query_length, head_dim, dtype, device, key_length=None):
    key_length = key_length or query_length
    q = torch.randn(batch, heads, query_length, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, key_length, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, key_length, head_dim, dtype=dtype, device=device)
    grad_out = torch.randn(batch, heads, query_length, head_dim, dtype=dtype, device=device)
    return q, k, v, grad_out


def documents_from_lengths(lengths: list[int], batch: int, device) -> torch.Tensor:
    """(batch, sum(lengths)) int32 ids 0, 0, ..., 1, ... for consecutive documents of these lengths."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.to(torch.int32).expand(batch, -1).contiguous().to(device)


def check_against_reference(backend, q, k, v, grad_out, *, causal, document_ids=None, scale=None):
    """Forward and gradients of ``backend`` vs autograd through the fp32 reference."""
    inputs = [tensor.detach().clone().requires_grad_() for tensor in (q, k, v)]
    with mkfast.use_backend(backend):
        out = attention(*inputs, causal=causal, document_ids=document_ids, scale=scale)
    grads = torch.autograd.grad(out, inputs, grad_out)

    reference_inputs = [tensor.detach().float().requires_grad_() for tensor in (q, k, v)]
    expected = attention_reference(*reference_inputs, causal=causal, document_ids=document_ids, scale=scale)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.float())

    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, expected, dtype=q.dtype, message="output")
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert grad.dtype == q.dtype
        assert_close(grad, expected_grad, dtype=q.dtype, scale=GRADIENT_SCALE, message=f"d{name}")


@pytest.mark.parametrize("device", devices_to_test())
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_triton_causal_matches_reference(shape, dtype, device):
    q, k, v, grad_out = make_inputs(*shape, dtype, device)
    check_against_reference("triton", q, k, v, grad_out, causal=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1, 1, 1, 257, 32), (2, 4, 2, 17, 64)], ids=["257", "17-gqa"])
def test_triton_non_causal_matches_reference(shape):
    q, k, v, grad_out = make_inputs(*shape, torch.float32, "cpu")
    check_against_reference("triton", q, k, v, grad_out, causal=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("causal", [True, False])
def test_document_mask_matches_reference_on_ragged_documents(causal, dtype):
    # A one-token document, one longer than a block, documents that straddle blocks.
    document_ids = documents_from_lengths([1, 40, 7, 82], batch=2, device="cpu")
    q, k, v, grad_out = make_inputs(2, 4, 2, 130, 64, dtype, "cpu")
    check_against_reference("triton", q, k, v, grad_out, causal=causal, document_ids=document_ids)


@pytest.mark.interpreter
def test_document_mask_rows_differ_and_ids_need_not_be_sorted():
    # Row 0: three packed documents (RA-CM3: two retrieved + the main one);
    # row 1: ids interleaved and unsorted, which the per-block [min, max] skip must not break.
    row_sorted = documents_from_lengths([30, 50, 21], batch=1, device="cpu")[0]
    row_shuffled = torch.tensor([5, 2, 5, 9] * 25 + [2], dtype=torch.int32)
    document_ids = torch.stack([row_sorted, row_shuffled])
    q, k, v, grad_out = make_inputs(2, 2, 1, 101, 32, torch.float32, "cpu")
    check_against_reference("triton", q, k, v, grad_out, causal=True,
                            document_ids=document_ids.to(torch.int64))


@pytest.mark.interpreter
def test_keys_longer_than_queries_are_causal_at_the_end():
    # A KV cache: 20 new queries are positions 30..49 of 50 keys.
    q, k, v, grad_out = make_inputs(2, 4, 2, 20, 64, torch.float32, "cpu", key_length=50)
    check_against_reference("triton", q, k, v, grad_out, causal=True)
    check_against_reference("triton", q, k, v, grad_out, causal=False)  # cross-attention: every key
    # Not the same as aligning the queries to the start: position 0 sees 31 keys, not 1.
    shifted = attention_reference(q, k[:, :, :20], v[:, :, :20], causal=True)
    assert not torch.allclose(attention_reference(q, k, v, causal=True), shifted, atol=1e-3)


@pytest.mark.interpreter
def test_triton_handles_non_contiguous_inputs_and_custom_scale():
    # transformers hands (B, S, H, D) projections transposed to (B, H, S, D): strided, not contiguous.
    q, k, v, grad_out = (tensor.transpose(1, 2).contiguous().transpose(1, 2)
                         for tensor in make_inputs(1, 2, 2, 33, 64, torch.float32, "cpu"))
    assert not q.is_contiguous()
    check_against_reference("triton", q, k, v, grad_out, causal=True, scale=0.3)


def test_triton_takes_the_pointer_path_where_tma_cannot_address_the_tensors():
    # TMA needs 16-byte strides: D=20 in fp16 is 40 bytes a row, so these run on plain loads.
    from mkfast.kernels.attention import _descriptors

    q, k, v, grad_out = make_inputs(1, 2, 1, 37, 20, torch.float16, "cpu")
    assert not _descriptors((q, k, v), (32, 32, 32), 32)[1]
    assert _descriptors(tuple(tensor[..., :16] for tensor in (q, k, v)), (32, 32, 32), 16)[1] is False
    assert _descriptors(make_inputs(1, 2, 1, 37, 24, torch.float16, "cpu")[:3], (32, 32, 32), 32)[1]
    document_ids = documents_from_lengths([20, 17], batch=1, device="cpu")
    check_against_reference("triton", q, k, v, grad_out, causal=True, document_ids=document_ids)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_backend_backward_matches_autograd(causal):
    document_ids = documents_from_lengths([3, 1, 13], batch=2, device="cpu")
    q, k, v, grad_out = make_inputs(2, 4, 2, 17, 16, torch.float32, "cpu")
    check_against_reference("reference", q, k, v, grad_out, causal=causal, document_ids=document_ids)


def test_empty_batch_returns_empty_output_with_gradients():
    q, k, v, _ = make_inputs(0, 2, 2, 5, 16, torch.float32, "cpu")
    q.requires_grad_()
    out = attention(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_cpu_backend_matches_reference_with_and_without_documents(shape, dtype):
    batch, heads, kv_heads, length, head_dim = shape
    q, k, v, grad_out = make_inputs(batch, heads, kv_heads, length, head_dim, dtype, "cpu")
    lengths = [length // 3, length - length // 3]
    document_ids = documents_from_lengths(lengths, batch, "cpu") if length > 2 else None
    for causal in (True, False):
        check_against_reference("cpu", q, k, v, grad_out, causal=causal)
        check_against_reference("cpu", q, k, v, grad_out, causal=causal, document_ids=document_ids)


def test_cpu_backend_aligns_causal_queries_to_the_last_keys():
    # ATen's is_causal aligns queries to the first keys; a KV cache needs the last ones.
    q, k, v, grad_out = make_inputs(2, 4, 2, 20, 64, torch.float32, "cpu", key_length=50)
    check_against_reference("cpu", q, k, v, grad_out, causal=True)
    check_against_reference("cpu", q, k, v, grad_out, causal=False)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_opcheck(backend):
    q, k, v, _ = make_inputs(1, 2, 1, 17, 16, torch.float32, "cpu")
    document_ids = documents_from_lengths([5, 12], batch=1, device="cpu")
    for tensor in (q, k, v):
        tensor.requires_grad_()
    with mkfast.use_backend(backend):
        run_opcheck(torch.ops.mkfast.attention.default, (q, k, v, True, document_ids, 0.25))


def test_auto_backend_on_cpu_is_aten_flash_attention():
    # The interpreter is orders of magnitude slower than either: never the automatic choice.
    from mkfast.ops.attention import attention_backends

    assert attention_backends.auto_choice(torch.device("cpu")) == "cpu"


BAD_INPUTS = [
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q, k.half(), v, {}), TypeError, "k must be float32"),
    (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q must be"),
    (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8], {}), ValueError, "head dim"),
    (lambda q, k, v: (q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), {}), ValueError,
     "multiple"),
    (lambda q, k, v: (q, k, v[:, :, :5], {}), ValueError, "same shape"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5], {}), ValueError, "at least as many positions"),
    (lambda q, k, v: (q, k, v, {"document_ids": torch.zeros(2, 9, dtype=torch.int32)}), ValueError,
     r"\(B, S\)"),
    (lambda q, k, v: (q, k, v, {"document_ids": torch.zeros(2, 11)}), TypeError,
     "document_ids must be int32/int64"),
    (lambda q, k, v: (q, k, v, {"causal": 1}), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("make_bad, error, message", BAD_INPUTS, ids=[case[2] for case in BAD_INPUTS])
def test_bad_inputs_are_refused_clearly(make_bad, error, message):
    q, k, v, _ = make_inputs(2, 4, 2, 11, 16, torch.float32, "cpu")
    q, k, v, kwargs = make_bad(q, k, v)
    with pytest.raises(error, match=message):
        attention(q, k, v, **kwargs)


def test_document_ids_with_a_kv_cache_are_refused():
    q, k, v, _ = make_inputs(1, 2, 2, 4, 16, torch.float32, "cpu", key_length=9)
    with pytest.raises(ValueError, match="S_q == S_kv"):
        attention(q, k, v, document_ids=torch.zeros(1, 4, dtype=torch.int32))


def test_under_autocast_mixed_inputs_run_in_its_dtype_like_sdpa():
    from mkfast.ops.attention import decode_attention

    q, k, v, _ = make_inputs(2, 4, 2, 11, 16, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v.bfloat16())  # a Llama under autocast hands over fp32 q, k and bf16 v
        lengths = torch.full((2,), 11, dtype=torch.int32)
        decoded = decode_attention(q[:, :, -1:], k.bfloat16(), v, lengths)
    assert out.dtype == decoded.dtype == torch.bfloat16
    assert_close(out, attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), dtype=torch.bfloat16)
    assert_close(decoded, out[:, :, -1:], dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="v must be float32"):  # outside autocast a mix is still refused
        attention(q, k, v.bfloat16())


def _fake_cuda(*shape):
    """Shapes only, no storage and no GPU: what the triton backend's grid checks read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(shape, dtype=torch.bfloat16, device="cuda")


@pytest.fixture
def triton_launches(monkeypatch):
    """The triton backends' implementations with their launchers stubbed: the list of launches
    that the grid checks let through (nothing runs)."""
    from mkfast.kernels import attention as attention_kernels
    from mkfast.kernels import decode_attention as decode_kernels

    from mkfast.ops.attention import (
        _attention_triton_backward,
        _attention_triton_forward,
        _decode_attention_triton,
    )

    launched = []
    monkeypatch.setattr(attention_kernels, "attention_forward", lambda *args: launched.append("forward"))
    monkeypatch.setattr(attention_kernels, "attention_backward", lambda *args: launched.append("backward"))
    monkeypatch.setattr(decode_kernels, "decode_attention_forward", lambda *args: launched.append("decode"))

    def forward(q, k):
        _attention_triton_forward(q, k, k, True, None, 0.1)

    def backward(q, k):
        _attention_triton_backward(q, q, k, k, q, q[..., 0], True, None, 0.1)

    def decode(k_cache):
        _decode_attention_triton(_fake_cuda(k_cache.shape[0], 1, 1, 64), k_cache, k_cache, None, 0.1)

    return launched, forward, backward, decode


def test_triton_grid_checks_hold_cuda_limits_per_axis(triton_launches):
    # (batch, head) sits on grid axis 0 of the attention kernels (2^31 - 1 programs): 70000 heads
    # launch. Their sequence blocks sit on axis 1 (65535): at D=64 the forward steps 128 queries,
    # the backward's delta pass 64, so S = 65535 * 128 runs forward but not backward. Decode puts
    # (batch, kv head) on axis 0 too: 65536 of them launch, 2^31 do not.
    launched, forward, backward, decode = triton_launches
    many_heads = _fake_cuda(1, 70_000, 16, 64)
    forward(many_heads, many_heads)
    backward(many_heads, many_heads)
    longest = _fake_cuda(1, 1, 65_535 * 128, 64)
    forward(longest, longest)
    decode(_fake_cuda(65_536, 1, 16, 64))
    assert launched == ["forward", "backward", "forward", "decode"]

    too_long = _fake_cuda(1, 1, 65_535 * 128 + 1, 64)
    with pytest.raises(ValueError, match=r"128 positions of q \(S=8388481\) on CUDA grid axis 1.*got 65536"):
        forward(too_long, too_long)
    with pytest.raises(ValueError, match=r"64 positions of q \(S=8388480\) on CUDA grid axis 1.*got 131070"):
        backward(longest, longest)
    with pytest.raises(ValueError, match=r"k_cache \(B \* Hkv = 65536 \* 32768\) on CUDA grid axis 0"):
        decode(_fake_cuda(65_536, 32_768, 16, 64))
    assert len(launched) == 4


# A batch slot 2^30 elements apart puts batch 2 at element 2^31: an int32 batch * stride wraps
# there and the kernel reads far outside the tensor (a crash under the interpreter, so the check
# runs in a child process). The storage is reserved, not touched: only the used slices are written.
LARGE_OFFSET_SCRIPT = r"""
import torch
import mkfast
from mkfast.ops.attention import (attention, attention_reference, decode_attention,
                                  decode_attention_reference)

torch.manual_seed(0)
batch, heads, kv_heads, length, head_dim, slot = 3, 2, 1, 24, 16, 2 ** 30
storage = torch.empty(2 * slot + 8 * heads * length * head_dim, dtype=torch.float16)

def view(start, num_heads):
    tensor = storage[start:].as_strided((batch, num_heads, length, head_dim),
                                        (slot, length * head_dim, head_dim, 1))
    for row in tensor:
        row.copy_(torch.randn(row.shape))
    return tensor

size = heads * length * head_dim
q, k, v = view(0, heads), view(size, kv_heads), view(2 * size, kv_heads)
assert q.storage_offset() + (batch - 1) * q.stride(0) >= 2 ** 31
grad_out = torch.randn(q.shape, dtype=q.dtype)
inputs = [tensor.detach().requires_grad_() for tensor in (q, k, v)]
references = [tensor.detach().float().requires_grad_() for tensor in (q, k, v)]
with mkfast.use_backend("triton"):
    out = attention(*inputs, causal=True)
    decoded = decode_attention(q[:, :, -2:], k, v, torch.full((batch,), length, dtype=torch.int32))
expected = attention_reference(*references, causal=True)
torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
for grad, expected_grad in zip(torch.autograd.grad(out, inputs, grad_out),
                               torch.autograd.grad(expected, references, grad_out.float())):
    torch.testing.assert_close(grad.float(), expected_grad, atol=4e-3, rtol=4e-3)
torch.testing.assert_close(decoded.float(), expected[:, :, -2:], atol=2e-3, rtol=2e-3)
print("ok")
"""


def test_offsets_past_two_to_the_31_elements_are_64_bit():
    import subprocess
    import sys

    from mkfast.backend import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        pytest.skip("the CPU tensors of this check need the Triton interpreter")
    completed = subprocess.run([sys.executable, "-c", LARGE_OFFSET_SCRIPT], capture_output=True, text=True,
                               timeout=600, check=False)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), (
        f"exit code {completed.returncode} (-11: a wrong address was read)\n{completed.stderr[-3000:]}")


# --------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("documents", [None, [1500, 1, 2595]], ids=["causal", "3-documents"])
def test_cuda_bf16_at_cm3_length_matches_reference(documents, head_dim):
    # RA-CM3's training shape: S=4096, bf16; the 3-document row includes a one-token document.
    document_ids = None if documents is None else documents_from_lengths(documents, batch=1, device="cuda")
    q, k, v, grad_out = make_inputs(1, 4, 2, 4096, head_dim, torch.bfloat16, "cuda")
    check_against_reference("triton", q, k, v, grad_out, causal=True, document_ids=document_ids)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_with_gqa_and_documents():
    # No atomics: dK/dV sums the group's query heads in one program, dQ is its own pass.
    document_ids = documents_from_lengths([1500, 1, 2595], batch=1, device="cuda")
    q, k, v, grad_out = make_inputs(1, 8, 2, 4096, 128, torch.bfloat16, "cuda")
    inputs = [tensor.requires_grad_() for tensor in (q, k, v)]
    first, second = (torch.autograd.grad(attention(*inputs, document_ids=document_ids), inputs, grad_out)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.cuda
def test_cuda_fp16_long_non_causal_documents_match_reference():
    document_ids = documents_from_lengths([1000, 24, 1024, 999], batch=2, device="cuda")
    q, k, v, grad_out = make_inputs(2, 8, 8, 3047, 128, torch.float16, "cuda")
    check_against_reference("triton", q, k, v, grad_out, causal=False, document_ids=document_ids)


# --------------------------------------------------------------------------- sm_90 compile (no GPU needed)
# Compiled through the launchers themselves (mkfast.audit's capture: fake CUDA tensors, the
# launch specialised as on an H100); registers, spills and wgmma are the audit gate's rules
# (tests/test_audit.py), so this checks what is particular to attention: TMA where the strides
# allow it, the pointer path where they do not, cp.async pipelining in dQ and decode.
SM90_COMPILE_SCRIPT = r"""
import json
import torch
from mkfast.audit.triton_static import compile_launch, record
from mkfast.kernels import attention, decode_attention

def launchers():
    for head_dim in (64, 128):
        q = torch.empty(1, 8, 4096, head_dim, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(1, 2, 4096, head_dim, dtype=torch.bfloat16, device="cuda")
        documents = torch.zeros(1, 4096, dtype=torch.int32, device="cuda")
        attention.attention_forward(q, k, k, True, documents, 0.1)
        lse = torch.empty(1, 8, 4096, device="cuda")
        grad_out = torch.empty_like(q)
        attention.attention_backward(grad_out, q, k, k, torch.empty_like(q), lse, True, documents, 0.1)
    # Rows 264 bytes apart (8-byte, not 16-byte, aligned): TMA cannot address them, pointers can.
    unaligned = torch.empty(1, 8, 4096, 132, dtype=torch.bfloat16, device="cuda")[..., :128]
    attention.attention_forward(unaligned, unaligned[:, :2], unaligned[:, :2], True, None, 0.1)
    cache = torch.empty(4, 8, 4096, 128, dtype=torch.bfloat16, device="cuda")
    lengths = torch.empty(4, dtype=torch.int32, device="cuda")
    query = torch.empty(4, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    decode_attention.decode_attention_forward(query, cache, cache, lengths, 0.1)

launches, stopped = record(launchers)
assert stopped is None, stopped
results = []
for launch in launches:
    compiled = compile_launch(launch)
    ttgir = compiled.asm["ttgir"]
    results.append({"kernel": launch.name, "tma": bool(launch.constants.get("USE_TMA")),
                    "tma_copies": "async_tma_copy" in ttgir,
                    "cp_async": "async_copy_global_to_local" in ttgir,
                    "mma_sync": "mma.sync" in compiled.asm["ptx"], "shared": compiled.metadata.shared})
print(json.dumps(results))
"""
H100_SHARED_MEMORY_BYTES = 227 * 1024


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_tma_or_pipelined_loads():
    """bf16 at S=4096, D=64/128, causal + documents, GQA: compiled for Hopper via the launchers.

    The forward and dK/dV take q/k/v through TMA when the strides allow it and fall
    back to pointer loads when not; dQ and decode pipeline with cp.async; no flash kernel
    keeps an mma.sync (dK/dV did, in its old queries-by-keys orientation); shared memory
    within an H100's 227 KB.
    """
    import json
    import os
    import subprocess
    import sys

    from mkfast.audit import sass

    if sass.tool("ptxas") is None:
        pytest.skip("no ptxas to compile for sm_90")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT], env=environment,
                               capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    kernels = [result["kernel"] for result in results]
    assert kernels.count("_attn_fwd_kernel") == 3 and "_decode_kernel" in kernels, kernels
    pointer_forward = [result for result in results if result["kernel"] == "_attn_fwd_kernel"][-1]
    # Strides TMA cannot take are not 16-divisible either, so Triton cannot prove the 4-byte
    # alignment cp.async needs: that path loads synchronously (it exists for correctness).
    assert not pointer_forward["tma"] and not pointer_forward["tma_copies"], pointer_forward
    for result in results:
        assert result["shared"] <= H100_SHARED_MEMORY_BYTES, result
        if result["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
            assert not result["mma_sync"], result
        if result["kernel"] in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_decode_kernel"):
            assert result["cp_async"], result
        takes_tma = result["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel")
        if takes_tma and result is not pointer_forward:
            assert result["tma"] and result["tma_copies"], result
