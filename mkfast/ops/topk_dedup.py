"""topk_dedup: exact maximum-inner-product top-k with RA-CM3's redundancy filter.

RA-CM3 (SPEC.md, "Retriever", diversity): walking down the ranked list, skip a
candidate whose score with the query, or with any document already taken, is
above the threshold (0.9).

Semantics, kept by every backend:
  rank all N memory rows by q·m descending (ties: lower index first); walk the
  list; skip a row if it is excluded, if q·m > threshold, or if m·m_s > threshold
  for a row s already taken; stop when k are taken. Scores and Gram products are
  computed in fp32 whatever the input dtype. Rows that fail to fill k are padded
  with score -inf and index -1.
"""

from __future__ import annotations

import torch

from mkfast.backend import OpDispatcher, native_unavailable_reason, triton_unavailable_reason
from mkfast.ops._checks import FLOAT_DTYPES, check_positive_int, check_same_size, check_tensor

# RA-CM3's redundancy threshold (docs/methods.md, "Retriever", diversity): the default here and
# wherever RA-CM3 retrieves (memory, training sequences, inference, the benchmark).
REDUNDANCY_THRESHOLD = 0.9

OP = "topk_dedup"

topk_dedup_backends = OpDispatcher(OP)


@topk_dedup_backends.register("reference")
def topk_dedup_reference(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    threshold: float = REDUNDANCY_THRESHOLD,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of the op, written to be read: a plain greedy walk.

    queries: (b, d), memory: (N, d), exclude: (b, E) int64 or None (-1 = padding).
    Returns scores (b, k) fp32 and indices (b, k) int64.
    """
    batch = queries.shape[0]
    scores_out = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=queries.device)
    indices_out = torch.full((batch, k), -1, dtype=torch.int64, device=queries.device)
    memory_f32 = memory.float()
    all_scores = queries.float() @ memory_f32.T  # (b, N)
    for query in range(batch):
        excluded = set() if exclude is None else set(exclude[query].tolist()) - {-1}
        # Stable descending sort: equal scores keep index order, lower index first.
        order = torch.sort(all_scores[query], descending=True, stable=True).indices.tolist()
        query_scores = all_scores[query].tolist()
        taken: list[int] = []
        for row in order:
            if row in excluded or not query_scores[row] <= threshold:
                continue
            if taken and bool((memory_f32[taken] @ memory_f32[row] > threshold).any()):
                continue
            scores_out[query, len(taken)] = query_scores[row]
            indices_out[query, len(taken)] = row
            taken.append(row)
            if len(taken) == k:
                break
    return scores_out, indices_out


def _native_reason_on(device_type: str):
    """The compiled kernel serves one device type per backend name ("cpu" / "cuda")."""

    def reason(device: torch.device) -> str | None:
        if device.type != device_type:
            return f"the {device_type} backend runs on {device_type} tensors"
        return native_unavailable_reason("topk_dedup_native", device)

    return reason


# csrc/topk_dedup_cpu.cpp and csrc/cuda/topk_dedup_cuda.cu: one schema, a kernel per device.
@topk_dedup_backends.register("cpu", _native_reason_on("cpu"))
@topk_dedup_backends.register("cuda", _native_reason_on("cuda"))
def _topk_dedup_native(queries, memory, k, threshold, exclude):
    return torch.ops.mkfast.topk_dedup_native(queries, memory, k, threshold, exclude)


@topk_dedup_backends.register("triton", triton_unavailable_reason)
def _topk_dedup_triton(queries, memory, k, threshold, exclude):
    from mkfast.kernels.topk_dedup import topk_dedup_triton

    return topk_dedup_triton(queries, memory, k, threshold, exclude, _exhaustive_fallback)


def _exhaustive_fallback(queries, memory, k, threshold, exclude):
    """For the rare queries whose walk outgrows the Triton pool: the compiled kernel, else the reference."""
    if native_unavailable_reason("topk_dedup_native", queries.device) is None:
        return torch.ops.mkfast.topk_dedup_native(queries, memory, k, threshold, exclude)
    return topk_dedup_reference(queries, memory, k, threshold, exclude)


@torch.library.custom_op("mkfast::topk_dedup", mutates_args=())
def _topk_dedup_op(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    threshold: float,
    exclude: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = topk_dedup_backends.select(queries.device)
    return backend.implementation(queries, memory, k, threshold, exclude)


@_topk_dedup_op.register_fake
def _(queries, memory, k, threshold, exclude):
    batch = queries.shape[0]
    return (
        queries.new_empty((batch, k), dtype=torch.float32),
        queries.new_empty((batch, k), dtype=torch.int64),
    )


def _validate(queries, memory, k, threshold, exclude) -> None:
    check_tensor(OP, "queries", queries, ndim=2, layout="(b, d)", dtypes=FLOAT_DTYPES)
    check_tensor(OP, "memory", memory, ndim=2, layout="(N, d)", dtypes=FLOAT_DTYPES, device=queries.device)
    check_same_size(OP, "last dim (d) like queries'", queries.shape[1], "memory", memory.shape[1])
    check_positive_int(OP, "k", k)
    if not isinstance(threshold, (int, float)):
        raise TypeError(f"{OP}: threshold must be a float, got {type(threshold).__name__}")
    if exclude is not None:
        check_tensor(OP, "exclude", exclude, ndim=2, layout="(b, E)", dtypes=(torch.int64,), device=queries.device)
        check_same_size(OP, "rows (b) like queries'", queries.shape[0], "exclude", exclude.shape[0])


def topk_dedup(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    *,
    threshold: float = REDUNDANCY_THRESHOLD,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` memory rows per query by inner product, skipping redundant ones.

    Args:
        queries: (b, d) fp32/fp16/bf16, L2-normalised (not checked: any vectors work).
        memory: (N, d) fp32/fp16/bf16, same device as ``queries``.
        k: number of rows to return per query (> 0; may exceed N).
        threshold: a row whose score with the query, or with a row already
            taken, is above it is skipped (RA-CM3 uses 0.9).
        exclude: (b, E) int64 rows never to return per query, -1 = padding.

    Returns:
        scores (b, k) fp32 and indices (b, k) int64, best first, padded with
        -inf / -1 when fewer than k rows survive the filter.
    """
    _validate(queries, memory, k, threshold, exclude)
    return _topk_dedup_op(queries, memory, k, float(threshold), exclude)
