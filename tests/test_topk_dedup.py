"""topk_dedup: every backend against the greedy-walk reference.

Backends tested here on CPU: "cpu" (the C++ kernel) in fp32/fp16/bf16 and
"triton" under the interpreter in fp32/fp16 (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU). On a GPU the `cuda` tests add the CUDA C++
and compiled Triton backends, bf16 and large memories.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, interpreter_dtypes, run_opcheck

import mkfast
from mkfast.backend import BackendUnavailableError
from mkfast.ops import topk_dedup, topk_dedup_reference

CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (backend, dtype) pairs that run on CPU tensors. The interpreter has no bf16 arithmetic.
CPU_BACKEND_DTYPES = ([("cpu", dtype) for dtype in CPU_DTYPES]
                      + [("triton", dtype) for dtype in interpreter_dtypes()])
# A GPU machine whose build found no matching nvcc has only the Triton kernels to test.
GPU_BACKENDS = [pytest.param("cuda", marks=pytest.mark.skipif(
    not mkfast._extension.built_parts()["cuda"], reason="mkfast._C was built without its CUDA kernels")),
    "triton"]


def _memory_with_near_duplicates(num_rows, dim, dtype=torch.float32, duplicates=0.3):
    """Unit rows where a fraction are jittered copies of others (cosine ~0.99), so the filter fires."""
    memory = F.normalize(torch.randn(num_rows, dim), dim=-1)
    copies = torch.rand(num_rows) < duplicates
    sources = torch.randint(0, num_rows, (num_rows,))
    memory[copies] = F.normalize(memory[sources[copies]] + 0.05 * torch.randn(int(copies.sum()), dim), dim=-1)
    return memory.to(dtype)


def _queries_near_rows(memory, batch, noise=0.02):
    """Queries close to memory rows, so some rows exceed the threshold with the query itself."""
    rows = memory[torch.arange(batch) % memory.shape[0]].float()
    return F.normalize(rows + noise * torch.randn_like(rows), dim=-1).to(memory.dtype)


def _assert_matches_reference(backend, queries, memory, k, threshold=0.9, exclude=None):
    expected_scores, expected_indices = topk_dedup_reference(queries, memory, k, threshold, exclude)
    with mkfast.use_backend(backend):
        scores, indices = topk_dedup(queries, memory, k, threshold=threshold, exclude=exclude)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    assert scores.shape == indices.shape == (queries.shape[0], k)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    # Scores accumulate in fp32 from the same inputs in every backend.
    assert_close(scores, expected_scores, dtype=torch.float32)
    return indices


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
@pytest.mark.parametrize("num_rows,dim,batch,k",
                         [(700, 64, 4, 8), (333, 37, 1, 5), (10, 24, 3, 16), (5, 8, 2, 3),
                          pytest.param(400, 40, 70, 6, marks=pytest.mark.slow)])
def test_backend_matches_reference_walk_with_planted_duplicates(backend, dtype, num_rows, dim, batch, k):
    # Shapes: d not a multiple of 16 (37, 24), b = 1, N < k (10 < 16), N barely above k,
    # b = 70 (Triton's 64-query blocks, one of them ragged).
    memory = _memory_with_near_duplicates(num_rows, dim, dtype)
    queries = _queries_near_rows(memory, batch)
    indices = _assert_matches_reference(backend, queries, memory, k)
    # The filter must have fired somewhere, or this test proves nothing about it.
    plain = torch.topk(queries.float() @ memory.float().T, min(k, num_rows), dim=1).indices
    assert not torch.equal(indices[:, : plain.shape[1]], plain)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cpu_bf16_prefilter_batches_match_reference(dtype):
    # From 8 queries on the CPU kernel estimates scores with a bf16 GEMM and rescores
    # only rows the estimate cannot rule out. Half the memory is a tight fan around
    # one direction whose scores differ by ~1e-4, far below bf16 resolution (~4e-3),
    # so a prefilter that dropped rows on the estimate alone would rank them wrongly.
    dim = 100
    direction = F.normalize(torch.randn(1, dim), dim=-1)
    fan = F.normalize(direction + 2e-3 * torch.randn(1500, dim), dim=-1)
    memory = torch.cat([_memory_with_near_duplicates(1500, dim), fan])[torch.randperm(3000)].to(dtype)
    queries = torch.cat([F.normalize(direction + 0.6 * torch.randn(80, dim), dim=-1),
                         _queries_near_rows(memory, 60)])
    exclude = torch.randint(-1, 3000, (140, 3))
    _assert_matches_reference("cpu", queries.to(dtype), memory, 8, exclude=exclude)
    _assert_matches_reference("cpu", queries.to(dtype), memory, 3, threshold=0.5)


@pytest.mark.parametrize("batch", [5, 63])
def test_cpu_memory_spanning_several_blocks_and_threads(batch):
    # 20000 rows span the threads' row ranges of both CPU paths (exact below 8 queries,
    # bf16 prefilter from 8) and several 4096-row prefilter blocks: pools must merge across them.
    memory = _memory_with_near_duplicates(20_000, 16)
    queries = _queries_near_rows(memory, batch, noise=0.3)
    _assert_matches_reference("cpu", queries, memory, 4)


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
def test_exact_ties_rank_lower_index_first(backend, dtype):
    # Entries are multiples of 1/4 in 16 dims: every product and partial sum is exact
    # in fp16/bf16/fp32, so scores tie bitwise in every backend and summation order.
    base = torch.tensor([[0.25] * 16, [0.25] * 8 + [-0.25] * 8,
                         [0.5] * 4 + [0.0] * 12, [0.0] * 12 + [0.5] * 4])
    memory = base[torch.tensor([1, 0, 2, 1, 3, 0, 2, 3, 1, 0])].to(dtype)  # each base row 2-3 times
    queries = torch.tensor([[0.25] * 16, [0.5] * 4 + [0.25] * 12]).to(dtype)
    # Threshold 0.5: exact copies (self-product 1.0) are redundant, distinct base rows are not.
    indices = _assert_matches_reference(backend, queries, memory, 4, threshold=0.5)
    # Query 0 scores 1.0 with base 0 (skipped: > threshold); base 2 and 3 tie at 0.5
    # (kept: not above it), base 1 scores 0; ties must take the lowest index.
    assert indices[0].tolist() == [2, 4, 0, -1]


@pytest.mark.parametrize("backend", sorted({backend for backend, _ in CPU_BACKEND_DTYPES}))
def test_threshold_is_compared_exactly_not_after_rounding_to_fp32(backend):
    # fp32(0.1) is just above the real number 0.1: a score equal to fp32(0.1) is
    # above a threshold of 0.1 and must be skipped, although it equals fp32(threshold).
    fp32_tenth = torch.tensor(0.1, dtype=torch.float32).item()
    memory = torch.zeros(4, 8)
    memory[0, 0], memory[0, 1] = fp32_tenth, 0.5  # score exactly fp32(0.1): skipped
    memory[1, 0], memory[1, 2] = 0.0625, 0.5      # score 0.0625: kept
    memory[2, 0], memory[2, 3] = -0.5, 0.5
    memory[3, 0], memory[3, 4] = fp32_tenth, -0.5  # Gram with row 0 is fp32(0.1)^2 - 0.25 < 0.1
    query = torch.zeros(1, 8)
    query[0, 0] = 1.0
    indices = _assert_matches_reference(backend, query, memory, 3, threshold=0.1)
    assert indices[0].tolist() == [1, 2, -1]


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
def test_fewer_survivors_than_k_are_padded(backend, dtype):
    # Every row is a near-copy of one of 3 directions: at most 3 rows can be taken.
    directions = F.normalize(torch.randn(3, 20), dim=-1)
    memory = F.normalize(directions[torch.arange(60) % 3] + 0.01 * torch.randn(60, 20), dim=-1).to(dtype)
    queries = F.normalize(torch.randn(2, 20), dim=-1).to(dtype)
    indices = _assert_matches_reference(backend, queries, memory, 6)
    assert (indices[:, 3:] == -1).all()


def _query_needing_a_wider_pool(cluster_size):
    """(query (1, 24), memory): the top 150 rows all score above the threshold with the query, and
    the next `cluster_size` are near-copies of one another: any first pool of ~2k+16 candidates
    is used up by skipped rows, so the answer needs the widened rescan."""
    dim = 24
    query = F.normalize(torch.randn(1, dim), dim=-1)
    other = F.normalize(torch.randn(1, dim), dim=-1)
    above = F.normalize(query + 0.05 * torch.randn(150, dim), dim=-1)
    cluster_direction = F.normalize(query + 1.2 * other, dim=-1)
    cluster = F.normalize(cluster_direction + 0.01 * torch.randn(cluster_size, dim), dim=-1)
    rest = F.normalize(torch.randn(200, dim), dim=-1)
    memory = torch.cat([rest[:100], above, cluster, rest[100:]])
    return query, memory[torch.randperm(len(memory))]


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
@pytest.mark.parametrize("cluster_size", [100, 300])
def test_widening_when_the_first_pool_is_exhausted(backend, dtype, cluster_size):
    # Triton: 100 fits its 4x pool, 300 needs the exhaustive fallback.
    query, memory = _query_needing_a_wider_pool(cluster_size)
    indices = _assert_matches_reference(backend, query.to(dtype), memory.to(dtype), 5)
    assert (indices >= 0).all()


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
def test_exclude_removes_rows_per_query(backend, dtype):
    memory = _memory_with_near_duplicates(200, 40, dtype)
    queries = _queries_near_rows(memory, 3, noise=0.5)
    _, plain = topk_dedup_reference(queries, memory, 4)
    # Exclude each query's first pick, plus padding and an index past the end.
    exclude = torch.tensor([[plain[0, 0].item(), -1, 500],
                            [plain[1, 0].item(), plain[1, 1].item(), -1],
                            [-1, -1, -1]])
    indices = _assert_matches_reference(backend, queries, memory, 4, exclude=exclude)
    assert plain[0, 0] not in indices[0] and plain[1, 1] not in indices[1]
    assert torch.equal(indices[2], plain[2])


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
def test_empty_batch_and_single_row_memory(backend, dtype):
    memory = F.normalize(torch.randn(1, 12), dim=-1).to(dtype)
    _assert_matches_reference(backend, torch.zeros(0, 12, dtype=dtype), memory, 3)
    _assert_matches_reference(backend, F.normalize(torch.randn(2, 12), dim=-1).to(dtype), memory, 3)


def test_non_contiguous_inputs_give_the_same_answer():
    memory = _memory_with_near_duplicates(300, 32)
    queries = _queries_near_rows(memory, 4)
    expected = topk_dedup(queries, memory, 5)
    strided_memory = torch.stack([memory, memory], dim=2).flatten(1)[:, ::2]  # stride (64, 2)
    actual = topk_dedup(queries.T.contiguous().T, strided_memory, 5)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_invalid_inputs_are_refused_with_the_argument_named():
    queries, memory = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="topk_dedup: k must be positive, got 0"):
        topk_dedup(queries, memory, 0)
    with pytest.raises(TypeError, match="topk_dedup: k must be an int, got float"):
        topk_dedup(queries, memory, 2.0)
    with pytest.raises(ValueError, match=r"memory must have last dim \(d\) like queries' 8, got 6"):
        topk_dedup(queries, torch.randn(10, 6), 2)
    with pytest.raises(TypeError, match="memory must be float32/float16/bfloat16, got torch.int64"):
        topk_dedup(queries, torch.ones(10, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(b, d\), got shape \(8,\)"):
        topk_dedup(torch.randn(8), memory, 2)
    with pytest.raises(TypeError, match="exclude must be int64, got torch.int32"):
        topk_dedup(queries, memory, 2, exclude=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"exclude must have rows \(b\) like queries' 2, got 3"):
        topk_dedup(queries, memory, 2, exclude=torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"threshold must be a float or None \(no filter\), got str"):
        topk_dedup(queries, memory, 2, threshold="0.9")
    with pytest.raises(ValueError, match=r"threshold must be a number or None \(no filter\), got nan"):
        topk_dedup(queries, memory, 2, threshold=float("nan"))
    with pytest.raises(TypeError, match="k must be an int, got float64"):
        topk_dedup(queries, memory, numpy.float64(2))


# Backends that run on CPU tensors here, each in a dtype it supports.
CPU_BACKENDS = sorted({backend for backend, _ in CPU_BACKEND_DTYPES}) + ["reference"]


def _memory_with_copies(num_rows, dim, copy_rows, generator):
    """Small random rows plus identical unit-norm copies of one row at `copy_rows`: the copies rank first
    for queries near that row, and their scores tie exactly only if every row is scored the same way."""
    memory = 0.1 * torch.randn(num_rows, dim, generator=generator)
    row = F.normalize(torch.randn(dim, generator=generator), dim=0)
    memory[copy_rows] = row
    return memory, row


# Every batch size for the cpu kernel (its paths change at 8 queries); the interpreter and the
# reference are slow, so they take the sizes where Triton's 16-query blocks change, 130 in the slow tier.
TIE_BATCHES = [("cpu", range(1, 131)), ("reference", (1, 17, 130)), ("triton", (1, 17)),
               pytest.param("triton", (130,), marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend,batches", TIE_BATCHES)
@pytest.mark.parametrize("num_rows,dim",
                         [(7, 13), (300, 37), pytest.param(2000, 768, marks=pytest.mark.slow)])
def test_identical_rows_tie_in_index_order_on_every_backend_and_batch_size(backend, batches, num_rows, dim):
    # A GEMM rounds identical rows differently by their position and the batch size: 7 copies came
    # back [4, 5, 6] for a query alone and [0, 1, 2] in a batch of 130, and backends disagreed.
    generator = torch.Generator().manual_seed(num_rows)
    copy_rows = sorted(torch.randperm(num_rows, generator=generator)[:7].tolist())
    memory, row = _memory_with_copies(num_rows, dim, copy_rows, generator)
    queries = 0.5 * row + 0.01 * torch.randn(130, dim, generator=generator)  # scores ~0.5: below 0.9
    with mkfast.use_backend(backend):
        for batch in batches:
            _, indices = topk_dedup(queries[:batch], memory, 7, threshold=None)
            assert indices.tolist() == [copy_rows] * batch, batch
            # With the filter on, the first copy is taken and the other six are redundant with it.
            _, indices = topk_dedup(queries[:batch], memory, 2, threshold=0.9)
            assert indices[:, 0].tolist() == [copy_rows[0]] * batch, batch
            assert not set(indices[:, 1].tolist()) & set(copy_rows), batch


@pytest.mark.parametrize("backend,dtype", CPU_BACKEND_DTYPES)
def test_threshold_none_turns_the_filter_off(backend, dtype):
    # Unnormalised rows score far above 1 and are near-copies of each other: with the default
    # threshold nothing survives, with None the answer is the plain ranking.
    direction = torch.randn(1, 24)
    memory = (3.0 * direction + 0.3 * torch.randn(50, 24)).to(dtype)
    queries = (direction + 0.1 * torch.randn(3, 24)).to(dtype)
    with mkfast.use_backend(backend):
        filtered = topk_dedup(queries, memory, 5)
        plain = topk_dedup(queries, memory, 5, threshold=None)
    assert (filtered[1] == -1).all()
    ranked = topk_dedup_reference(queries, memory, 5, threshold=float("inf"))
    torch.testing.assert_close(plain[1], ranked[1], rtol=0, atol=0)
    assert_close(plain[0], ranked[0], dtype=torch.float32)
    scores = queries.float() @ memory.float().T
    assert_close(plain[0], torch.topk(scores, 5, dim=1).values, dtype=dtype, scale=4.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [2, 130])
def test_nan_in_memory_or_queries_is_refused_naming_the_query(backend, batch):
    # A NaN score cannot be ranked: the op raises instead of dropping the row (the cpu kernel
    # scores 2 queries exactly, 130 through its bf16 prefilter).
    if backend != "cpu" and batch > 2:
        pytest.skip("the batch-size paths are the cpu kernel's")
    memory, queries = torch.randn(40, 16), torch.randn(batch, 16)
    memory[17, 3] = float("nan")
    with mkfast.use_backend(backend), pytest.raises(ValueError, match="a score of query 0 is NaN"):
        topk_dedup(queries, memory, 3)
    queries[1, 0] = float("nan")
    with mkfast.use_backend(backend), pytest.raises(ValueError, match="a score of query 1 is NaN"):
        topk_dedup(queries, torch.randn(40, 16), 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_numpy_integer_k_and_outputs_without_grad(backend):
    memory = _memory_with_near_duplicates(50, 16).requires_grad_()
    queries = _queries_near_rows(memory.detach(), 3).requires_grad_()
    with mkfast.use_backend(backend):
        scores, indices = topk_dedup(queries, memory, numpy.int64(4))
        expected = topk_dedup(queries.detach(), memory.detach(), 4)
    # The op has no backward: outputs must not claim a gradient they cannot give.
    assert not scores.requires_grad and not indices.requires_grad
    torch.testing.assert_close((scores, indices), expected, rtol=0, atol=0)


def test_triton_backend_refuses_bf16_cpu_tensors():
    # The interpreter multiplies bf16 bit patterns as integers: scores of ~1e9-1e32 came back.
    memory = torch.randn(20, 16)
    with mkfast.use_backend("triton"), \
            pytest.raises(BackendUnavailableError, match="cannot run bf16 CPU tensors"):
        topk_dedup(memory[:2].bfloat16(), memory.bfloat16(), 3)
    with mkfast.use_backend("triton"), pytest.raises(BackendUnavailableError, match="memory torch.bfloat16"):
        topk_dedup(memory[:2], memory.bfloat16(), 3)


def test_cuda_backend_is_refused_on_cpu_tensors_with_the_reason():
    with mkfast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="runs on cuda tensors"):
        topk_dedup(torch.randn(2, 8), torch.randn(10, 8), 2)


def test_unnormalised_inputs_are_allowed():
    memory = 3.0 * _memory_with_near_duplicates(100, 16)
    queries = 0.5 * _queries_near_rows(memory, 2)
    _assert_matches_reference("cpu", queries, memory, 4)


def test_custom_op_passes_opcheck():
    memory = _memory_with_near_duplicates(64, 16)
    run_opcheck(torch.ops.mkfast.topk_dedup.default, (memory[:3].clone(), memory, 4, 0.9, None))


# Compiles the Triton kernels to cubins for sm_80 and sm_90 without a GPU, so a
# construct the interpreter accepts but the compiler rejects (a non-constexpr
# global, a bad dot precision) fails here rather than on the first GPU run.
AHEAD_OF_TIME_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import mkfast.kernels.topk_dedup as kernels

scan = {"queries_ptr": "*bf16", "memory_ptr": "*bf16", "exclude_ptr": "*i64", "keys_out_ptr": "*i64",
        "nan_out_ptr": "*i8", "batch": "i32", "num_rows": "i32", "dim": "i32", "exclude_width": "i32",
        "rows_per_split": "i32", "num_splits": "i32", "threshold": "fp32", "stride_query": "i32",
        "stride_memory": "i32", "POOL": "constexpr", "BLOCK_QUERIES": "constexpr", "BLOCK_ROWS": "constexpr",
        "BLOCK_DIM": "constexpr", "UPCAST_MEMORY": "constexpr"}
walk = {"keys_ptr": "*i64", "memory_ptr": "*bf16", "scores_out_ptr": "*fp32", "indices_out_ptr": "*i64",
        "short_out_ptr": "*i8", "dim": "i32", "k": "i32", "threshold": "fp32", "stride_memory": "i32",
        "POOL": "constexpr", "BLOCK_DIM": "constexpr"}
narrow, wide = kernels.BLOCK_QUERIES, kernels.WIDE_BLOCK_QUERIES
cases = [(90, "bf16", "bf16", 128, False, narrow), (80, "fp16", "fp16", 32, False, narrow),
         (90, "fp32", "fp32", 32, False, narrow), (90, "fp32", "fp16", 32, True, narrow),
         (90, "bf16", "bf16", 32, False, wide), (80, "fp16", "fp16", 128, False, wide)]
for arch, query_dtype, dtype, pool, upcast, block_queries in cases:
    constants = {"POOL": pool, "BLOCK_QUERIES": block_queries, "BLOCK_ROWS": kernels.BLOCK_ROWS,
                 "BLOCK_DIM": kernels.BLOCK_DIM, "UPCAST_MEMORY": upcast}
    source = ASTSource(kernels._topk_dedup_scan_kernel, dict(scan, queries_ptr="*" + query_dtype,
                                                               memory_ptr="*" + dtype), constexprs=constants)
    options = {"num_warps": kernels.scan_warps(block_queries, pool)}
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm
    source = ASTSource(kernels._topk_dedup_walk_kernel, dict(walk, memory_ptr="*" + dtype),
                       constexprs={"POOL": pool, "BLOCK_DIM": kernels.BLOCK_DIM})
    options = {"num_warps": kernels.WALK_WARPS}
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm
"""


def test_triton_kernels_compile_for_ampere_and_hopper():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME_COMPILE], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_rows,dim,batch,k", [(5000, 768, 8, 8), (1234, 100, 3, 16), (7, 24, 2, 8)])
def test_gpu_backend_matches_reference(backend, dtype, num_rows, dim, batch, k):
    memory = _memory_with_near_duplicates(num_rows, dim, dtype).cuda()
    queries = _queries_near_rows(memory, batch)
    _assert_matches_reference(backend, queries, memory, k)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_large_bf16_memory_matches_cpu_kernel(backend):
    # 3M rows span many memory chunks and selection segments; the CPU kernel (tested
    # against the reference above) is the oracle because the reference is too slow here.
    generator = torch.Generator().manual_seed(1)
    memory = F.normalize(torch.randn(3_000_000, 256, generator=generator), dim=-1).to(torch.bfloat16)
    queries = _queries_near_rows(memory[:300_000], 64)
    expected = topk_dedup(queries, memory, 16)
    with mkfast.use_backend(backend):
        actual = topk_dedup(queries.cuda(), memory.cuda(), 16, exclude=None)
    torch.testing.assert_close(actual[1].cpu(), expected[1], rtol=0, atol=0)
    assert_close(actual[0].cpu(), expected[0], dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_widening_to_the_exhaustive_path(backend):
    # 3000 near-copies rank first below the threshold: every bounded pool is used
    # up by redundant rows, so both GPU backends reach their exhaustive path.
    dim = 24
    query = F.normalize(torch.randn(2, dim), dim=-1)
    other = F.normalize(torch.randn(1, dim), dim=-1)
    center = F.normalize(query[:1] + 1.2 * other, dim=-1)
    cluster = F.normalize(center + 0.01 * torch.randn(3000, dim), dim=-1)
    memory = torch.cat([cluster, F.normalize(torch.randn(2000, dim), dim=-1)]).cuda()
    _assert_matches_reference(backend, query.cuda(), memory, 8)


def test_cuda_selection_pieces_pass_their_host_build(tmp_path):
    # The CUDA top-k's key order, bitonic sort, pool flushing and score order are
    # __host__ __device__ functions (csrc/cuda/topk_select.cuh): a C++ build checks them without a GPU.
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    binary = tmp_path / "topk_select_test"
    built = subprocess.run([compiler, "-std=c++20", "-O2", f"-I{root / 'csrc'}", "-o", str(binary),
                            str(root / "tests" / "csrc" / "topk_select_test.cpp")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_identical_rows_tie_across_segments_and_batch_sizes(dtype):
    # The CUDA scan splits 70001 rows into segments of whole 256-row tiles (how many depends on
    # the SM count and the batch) and takes 1 query per block at b=1, 8 from b=2: copies sit at
    # the first and last rows and at tile edges, and every batch size must score them alike.
    num_rows, dim = 70_001, 100
    generator = torch.Generator().manual_seed(5)
    copy_rows = [0, 255, 256, 4607, 4608, 40_000, num_rows - 1]
    memory, row = _memory_with_copies(num_rows, dim, copy_rows, generator)
    queries = 0.5 * row + 0.01 * torch.randn(256, dim, generator=generator)  # scores ~0.5: below 0.9
    memory, queries = memory.to(dtype).cuda(), queries.to(dtype).cuda()
    with mkfast.use_backend("cuda"):
        alone, _ = topk_dedup(queries[:1], memory, 7, threshold=None)
        for batch in (1, 63, 64, 65, 256):
            scores, indices = topk_dedup(queries[:batch], memory, 7, threshold=None)
            assert indices.tolist() == [copy_rows] * batch, batch
            assert (scores == scores[:, :1]).all(), batch  # identical rows, identical scores
            torch.testing.assert_close(scores[:1], alone, rtol=0, atol=0)  # not a function of the batch
            _, indices = topk_dedup(queries[:batch], memory, 2, threshold=0.9)
            assert indices[:, 0].tolist() == [copy_rows[0]] * batch, batch
            assert not set(indices[:, 1].tolist()) & set(copy_rows), batch


@pytest.mark.cuda
@pytest.mark.parametrize("cluster_size", [100, 300, 700])
def test_cuda_widening_through_every_pool_size(cluster_size):
    # k=5: pools of 32, then 128 (cluster 100), 512 (300) and past the largest scan pool, every
    # eligible row (700). With 8 random queries beside it, the redo takes a subset of the batch.
    query, memory = _query_needing_a_wider_pool(cluster_size)
    queries = torch.cat([query, F.normalize(torch.randn(8, query.shape[1]), dim=-1)])
    indices = _assert_matches_reference("cuda", queries.cuda(), memory.cuda(), 5)
    assert (indices[0] >= 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,query_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                               (torch.float32, None), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dim", [100, 768])
def test_cuda_wide_query_blocks_with_exclusions_match_reference(dtype, query_dtype, dim):
    # 70 queries: a 64-query tensor-core block and a ragged one for fp16/bf16 (8-query CUDA-core
    # blocks for fp32 and for fp32 queries on bf16 memory); d=100 takes the element-wise loads,
    # 768 the aligned vector ones; 3001 rows end in a ragged tile.
    memory = _memory_with_near_duplicates(3001, dim, dtype).cuda()
    queries = _queries_near_rows(memory, 70).to(query_dtype or dtype)
    exclude = torch.randint(-1, 3001, (70, 3)).cuda()
    _assert_matches_reference("cuda", queries, memory, 8, exclude=exclude)
