"""topk_dedup: every backend against the greedy-walk reference."""

import pytest
import torch
import torch.nn.functional as F

import mkfast
from helpers import run_opcheck
from mkfast.ops import topk_dedup, topk_dedup_reference


def _memory_with_near_duplicates(num_rows, dim, dtype=torch.float32, duplicates=0.3):
    """Unit rows where a fraction are jittered copies of others (cosine ~0.99), so the filter fires."""
    memory = F.normalize(torch.randn(num_rows, dim), dim=-1)
    copies = torch.rand(num_rows) < duplicates
    sources = torch.randint(0, num_rows, (num_rows,))
    memory[copies] = F.normalize(memory[sources[copies]] + 0.05 * torch.randn(int(copies.sum()), dim), dim=-1)
    return memory.to(dtype)


@pytest.mark.parametrize("num_rows,dim,batch,k", [(1000, 64, 4, 8), (333, 37, 1, 5), (10, 24, 3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_backend_matches_reference_walk(num_rows, dim, batch, k, dtype):
    memory = _memory_with_near_duplicates(num_rows, dim, dtype)
    # Queries near memory rows, so some rows exceed the threshold with the query itself.
    queries = F.normalize(memory[:batch].float() + 0.02 * torch.randn(batch, dim), dim=-1).to(dtype)
    expected = topk_dedup_reference(queries, memory, k, 0.9)
    with mkfast.use_backend("cpu"):
        scores, indices = topk_dedup(queries, memory, k)
    torch.testing.assert_close(indices, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(scores, expected[0])


def test_invalid_inputs_are_refused_with_the_argument_named():
    queries, memory = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="topk_dedup: k must be positive, got 0"):
        topk_dedup(queries, memory, 0)
    with pytest.raises(ValueError, match=r"memory must have last dim \(d\) like queries' 8, got 6"):
        topk_dedup(queries, torch.randn(10, 6), 2)
    with pytest.raises(TypeError, match="memory must be float32/float16/bfloat16, got torch.int64"):
        topk_dedup(queries, torch.ones(10, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(b, d\), got shape \(8,\)"):
        topk_dedup(torch.randn(8), memory, 2)


def test_custom_op_passes_opcheck():
    memory = _memory_with_near_duplicates(64, 16)
    run_opcheck(torch.ops.mkfast.topk_dedup.default, (memory[:3].clone(), memory, 4, 0.9, None))
