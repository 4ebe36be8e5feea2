"""topk_dedup: exact maximum-inner-product top-k with RA-CM3's redundancy filter.

RA-CM3 (docs/methods.md, R2 "Retriever", diversity): walking down the ranked list,
skip a candidate whose score with the query, or with any document already taken,
is above the threshold (0.9).

Semantics, kept by every backend:
  rank all N memory rows by q·m descending (ties: lower index first); walk the
  list; skip a row if it is excluded, if q·m > threshold, or if m·m_s > threshold
  for a row s already taken; stop when k are taken. ``threshold=None`` turns the
  filter off (plain top-k). Rows that fail to fill k are padded with score -inf
  and index -1.

Numerics, kept by every backend:
  - every score is one fp32 dot product (fp32 accumulation whatever the input
    dtype) computed the same way for every row, wherever the row sits in the
    memory and whatever the batch size: rows with identical contents score
    identically and so tie, and ties go to the lower index on every backend.
    Rows with different contents may still differ in the last bits of their
    scores from one backend to another (summation orders differ). Tested on the
    reference, cpu and Triton (interpreter) backends; the cuda backend scores in
    one fixed order per dtype pair too (csrc/cuda/topk_dedup_cuda.cu), its tests
    run on a GPU;
  - a NaN score (NaN in the queries or memory, or inf times 0) cannot be ranked:
    the op raises ValueError naming the query rather than drop or misplace the row;
  - the outputs carry no gradient (requires_grad=False): indices are not
    differentiable, and a user who needs the scores' gradient recomputes q·m for
    the returned rows.
"""

from __future__ import annotations

import math
import numbers

import torch

from mkfast.backend import (
    BackendUnavailableError,
    OpDispatcher,
    native_unavailable_reason,
    triton_unavailable_reason,
)
from mkfast.ops._checks import FLOAT_DTYPES, check_positive_int, check_same_size, check_tensor

# RA-CM3's redundancy threshold (docs/methods.md, "Retriever", diversity): the default here and
# wherever RA-CM3 retrieves (memory, training sequences, inference, the benchmark).
REDUNDANCY_THRESHOLD = 0.9

OP = "topk_dedup"

# On a GPU, auto takes the Triton kernel first: the interpreter runs it whole in CI, where the
# CUDA kernel's selection pieces are checked only through a host build. Neither has run on a
# GPU; `mkfast bench topk_dedup` times both there, and the order should follow that measurement.
topk_dedup_backends = OpDispatcher(OP, auto_order={"cuda": ("triton", "cuda", "reference")})


def nan_score_error(query: int) -> ValueError:
    """The one message every backend gives for a NaN score (the C++ kernels spell it the same)."""
    return ValueError(f"{OP}: a score of query {query} is NaN (NaN in queries or memory, or inf times 0): "
                      "NaN rows cannot be ranked; remove or fix them")


def _row_dots(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """fp32 dot of each row with ``vector``, the same reduction for every row.

    Not ``rows @ vector``: a GEMV rounds rows differently by their position, so
    identical rows would not tie (measured: 7 copies of a row at N=7, d=13).
    """
    return (rows * vector).sum(dim=1)


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
    threshold: float (inf = no filter). Returns scores (b, k) fp32 and indices (b, k) int64.
    """
    batch = queries.shape[0]
    scores_out = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=queries.device)
    indices_out = torch.full((batch, k), -1, dtype=torch.int64, device=queries.device)
    memory_f32 = memory.float()
    for query in range(batch):
        query_scores = _row_dots(memory_f32, queries[query].float())  # (N,)
        if bool(query_scores.isnan().any()):
            raise nan_score_error(query)
        excluded = set() if exclude is None else set(exclude[query].tolist()) - {-1}
        # Stable descending sort: equal scores keep index order, lower index first.
        order = torch.sort(query_scores, descending=True, stable=True).indices.tolist()
        query_scores = query_scores.tolist()
        taken: list[int] = []
        for row in order:
            if row in excluded or query_scores[row] > threshold:
                continue
            if taken and bool((_row_dots(memory_f32[taken], memory_f32[row]) > threshold).any()):
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

    if queries.device.type == "cpu" and torch.bfloat16 in (queries.dtype, memory.dtype):
        # The interpreter multiplies bf16 bit patterns as integers: scores came out ~1e9-1e32.
        raise BackendUnavailableError(
            f"{OP}: the triton backend cannot run bf16 CPU tensors (the Triton interpreter has no bf16 "
            f"arithmetic), got queries {queries.dtype} and memory {memory.dtype}; use the cpu or reference "
            "backend, or CUDA tensors")

    return topk_dedup_triton(queries, memory, k, threshold, exclude, _exhaustive_fallback, nan_score_error)


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


def _validate(queries, memory, k, threshold, exclude) -> tuple[int, float]:
    """Checks every backend shares; returns k as an int and the threshold as a float (inf = no filter)."""
    check_tensor(OP, "queries", queries, ndim=2, layout="(b, d)", dtypes=FLOAT_DTYPES)
    check_tensor(OP, "memory", memory, ndim=2, layout="(N, d)", dtypes=FLOAT_DTYPES, device=queries.device)
    check_same_size(OP, "last dim (d) like queries'", queries.shape[1], "memory", memory.shape[1])
    k = check_positive_int(OP, "k", k)
    if threshold is None:
        threshold = math.inf
    elif isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"{OP}: threshold must be a float or None (no filter), got {type(threshold).__name__}")
    elif math.isnan(threshold):
        raise ValueError(f"{OP}: threshold must be a number or None (no filter), got nan")
    if exclude is not None:
        check_tensor(OP, "exclude", exclude, ndim=2, layout="(b, E)", dtypes=(torch.int64,),
                     device=queries.device)
        check_same_size(OP, "rows (b) like queries'", queries.shape[0], "exclude", exclude.shape[0])
    return k, float(threshold)


def topk_dedup(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    *,
    threshold: float | None = REDUNDANCY_THRESHOLD,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` memory rows per query by inner product, skipping redundant ones.

    Args:
        queries: (b, d) fp32/fp16/bf16, L2-normalised (not checked: any vectors work).
        memory: (N, d) fp32/fp16/bf16, same device as ``queries``.
        k: number of rows to return per query (> 0; may exceed N; a NumPy integer works).
        threshold: a row whose score with the query, or with a row already
            taken, is above it is skipped (RA-CM3 uses 0.9). ``None`` (or inf)
            turns the filter off: a plain top-k. NaN is refused.
        exclude: (b, E) int64 rows never to return per query, -1 = padding.

    Returns:
        scores (b, k) fp32 and indices (b, k) int64, best first, padded with
        -inf / -1 when fewer than k rows survive the filter; neither requires grad.
        Equal scores come lower index first (identical rows tie exactly; see the module doc).

    Raises:
        ValueError: a score is NaN (NaN in ``queries`` or ``memory``), or ``threshold`` is NaN.
    """
    k, threshold = _validate(queries, memory, k, threshold, exclude)
    # The op has no backward: detached inputs give outputs that do not claim a gradient.
    detached_exclude = None if exclude is None else exclude.detach()
    return _topk_dedup_op(queries.detach(), memory.detach(), k, threshold, detached_exclude)
