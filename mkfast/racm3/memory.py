"""RA-CM3's retrieval memory: document embeddings + ids, searched with topk_dedup.

RA-CM3 (docs/methods.md, eq. R1): a dense MIPS index over unit-norm CLIP embeddings
of documents; the K retrieved documents are taken walking down the ranked list,
skipping any whose score with the query, or with a document already taken, is
above 0.9. ``Memory.search`` does that exactly with :func:`mkfast.ops.topk_dedup`;
``Memory.search_faiss`` takes candidates from a FAISS index instead (IndexFlatIP,
or IVF / IVF-PQ for memories too large for exact search) and applies the same
filter, widening the candidate pool when the filter leaves fewer than k;
``Memory.search_sharded`` searches a memory split across torch.distributed ranks.

    memory = Memory.build(encoder, documents, batch_size=256)
    memory.save("memory_dir")
    memory = Memory.load("memory_dir")
    scores, document_ids = memory.search(queries, k=2)   # (b, k) each, -1 = none
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence

import torch

from mkfast.ops import topk_dedup
from mkfast.ops.topk_dedup import REDUNDANCY_THRESHOLD
from mkfast.racm3.memory_files import (
    METADATA_FILE,
    MemoryLockedError,  # noqa: F401  (raised by Memory.save; callers import it from here)
    read_memory,
    write_memory,
)

DEFAULT_THRESHOLD = REDUNDANCY_THRESHOLD
# First FAISS / shard candidate pool per query: 4k + 32 leaves room for the rows
# the filter skips in typical memories; the pool doubles until the walk is exact.
FIRST_POOL_PER_K = 4
FIRST_POOL_EXTRA = 32
# Rows scored at once when a shard collects its candidates: bounds the (b, rows)
# score block to 256 MiB at b=1024 whatever the shard size.
SHARD_ROWS_PER_CHUNK = 65536
FAISS_KINDS = ("flat", "ivf", "ivfpq")


class Memory:
    """Embeddings of N documents and their ids.

    embeddings: (N, d) float (unit-norm for RA-CM3's scores; not enforced).
    document_ids: (N,) int64, unique, non-negative (-1 marks "no document" in results).
    """

    def __init__(self, embeddings: torch.Tensor, document_ids: torch.Tensor | None = None):
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError(f"Memory: embeddings must be a 2-D (N, d) tensor, got {_describe(embeddings)}")
        if not embeddings.is_floating_point():
            raise TypeError(f"Memory: embeddings must be floating point, got {embeddings.dtype}")
        if document_ids is None:
            document_ids = torch.arange(embeddings.shape[0], dtype=torch.int64)
        document_ids = torch.as_tensor(document_ids)
        if document_ids.shape != (embeddings.shape[0],) or document_ids.dtype != torch.int64:
            raise ValueError(
                f"Memory: document_ids must be int64 of shape ({embeddings.shape[0]},) "
                "like embeddings' rows, "
                f"got {document_ids.dtype} {tuple(document_ids.shape)}"
            )
        if document_ids.numel() and (
            document_ids.min() < 0 or torch.unique(document_ids).numel() != len(document_ids)
        ):
            raise ValueError("Memory: document_ids must be unique and non-negative")
        self.embeddings = embeddings.contiguous()
        self.document_ids = document_ids.to(embeddings.device)
        # Sorted ids and their rows: maps document ids (e.g. exclude_ids) to rows.
        self._sorted_ids, self._sorted_rows = torch.sort(self.document_ids)
        self._faiss_index = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __repr__(self) -> str:
        return f"Memory(num_documents={len(self)}, dim={self.dim}, dtype={self.embeddings.dtype})"

    # ---------------------------------------------------------------- building
    @classmethod
    def from_arrays(cls, embeddings, document_ids=None, *, normalize: bool = False) -> Memory:
        """From tensors or numpy arrays: embeddings (N, d), document_ids (N,) or None (0..N-1)."""
        embeddings = torch.as_tensor(embeddings)
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1).to(embeddings.dtype)
        if document_ids is not None:
            document_ids = torch.as_tensor(document_ids, dtype=torch.int64)
        return cls(embeddings, document_ids)

    @classmethod
    def build(
        cls,
        encoder: Callable[[Sequence], torch.Tensor],
        documents: Sequence,
        *,
        batch_size: int = 256,
        document_ids: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        show_progress: bool = True,
    ) -> Memory:
        """Encode ``documents`` in batches: ``encoder(list_of_documents) -> (batch, d)`` tensor.

        RA-CM3's encoder is the mixed-modal CLIP encoder (unit-norm outputs).
        Rows are stored on the CPU, in ``dtype`` if given (e.g. fp16 to halve memory).
        """
        from tqdm.auto import tqdm

        if batch_size <= 0:
            raise ValueError(f"Memory.build: batch_size must be positive, got {batch_size}")
        chunks = []
        starts = range(0, len(documents), batch_size)
        for start in tqdm(starts, desc="encoding memory", unit="batch", disable=not show_progress):
            batch = [documents[index] for index in range(start, min(start + batch_size, len(documents)))]
            with torch.no_grad():
                encoded = encoder(batch)
            if encoded.dim() != 2 or encoded.shape[0] != len(batch):
                raise ValueError(
                    f"Memory.build: encoder must return ({len(batch)}, d), got {tuple(encoded.shape)}"
                )
            chunks.append(encoded.detach().to("cpu", dtype or encoded.dtype))
        if not chunks:
            raise ValueError("Memory.build: documents is empty")
        ids = None if document_ids is None else torch.as_tensor(document_ids, dtype=torch.int64)
        return cls(torch.cat(chunks), ids)

    def to(self, device: torch.device | str) -> Memory:
        return Memory(self.embeddings.to(device), self.document_ids.to(device))

    # ------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike, *, wait: bool = True) -> None:
        """Write ``directory``/memory.json and one embeddings file, atomically (see memory_files).

        A save killed anywhere leaves the previous memory loadable; the next save removes
        what it left. Saves to one directory take a lock: a second one waits, or with
        ``wait=False`` raises :class:`MemoryLockedError`.
        """
        metadata = {"num_documents": len(self), "dim": self.dim,
                    "dtype": str(self.embeddings.dtype).removeprefix("torch.")}
        tensors = {"embeddings": self.embeddings.cpu(), "document_ids": self.document_ids.cpu()}
        write_memory(directory, tensors, metadata, wait=wait)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> Memory:
        """The memory :meth:`save` wrote last. Errors name the file that is missing or damaged."""
        tensors, metadata, path = read_memory(directory, str(device))
        if set(tensors) != {"embeddings", "document_ids"}:
            raise ValueError(f"Memory.load: {path} must hold 'embeddings' and 'document_ids', "
                             f"got {sorted(tensors)}")
        memory = cls(tensors["embeddings"], tensors["document_ids"])
        if len(memory) != metadata["num_documents"] or memory.dim != metadata["dim"]:
            raise ValueError(f"Memory.load: {path} holds ({len(memory)}, {memory.dim}), {METADATA_FILE} says "
                             f"({metadata['num_documents']}, {metadata['dim']})")
        return memory

    # ------------------------------------------------------------------ search
    def rows_of(self, document_ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``document_ids`` (any shape, int64); -1 where an id is absent (or is -1)."""
        document_ids = torch.as_tensor(document_ids, dtype=torch.int64, device=self.document_ids.device)
        if len(self) == 0:
            return torch.full_like(document_ids, -1)
        positions = torch.searchsorted(self._sorted_ids, document_ids.contiguous()).clamp(max=len(self) - 1)
        found = self._sorted_ids[positions] == document_ids
        return torch.where(found, self._sorted_rows[positions], torch.full_like(document_ids, -1))

    def _ids_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.document_ids.device)
        ids = self.document_ids[rows.clamp(min=0)]
        return torch.where(rows >= 0, ids, torch.full_like(ids, -1))

    def _prepare(self, queries, k, exclude_ids):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"Memory.search: k must be a positive int, got {k!r}")
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"Memory.search: queries must be (b, {self.dim}), got {_describe(queries)}")
        queries = queries.to(self.embeddings.device)
        exclude_rows = None
        if exclude_ids is not None:
            exclude_ids = torch.as_tensor(exclude_ids, dtype=torch.int64, device=self.embeddings.device)
            if exclude_ids.dim() == 1:
                exclude_ids = exclude_ids[:, None]
            if exclude_ids.dim() != 2 or exclude_ids.shape[0] != queries.shape[0]:
                raise ValueError(f"Memory.search: exclude_ids must be (b, E) with b={queries.shape[0]}, "
                                 f"got {tuple(exclude_ids.shape)}")
            exclude_rows = self.rows_of(exclude_ids)
        return queries, exclude_rows

    def search(self, queries: torch.Tensor, k: int, threshold: float = DEFAULT_THRESHOLD,
               exclude_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact RA-CM3 retrieval: queries (b, d) -> scores (b, k) fp32, document_ids (b, k) int64.

        exclude_ids: (b, E) or (b,) document ids never returned for that query
        (RA-CM3 training excludes the query's own document), -1 = padding.
        Padded with -inf / -1 where fewer than k documents survive the filter.
        """
        queries, exclude_rows = self._prepare(queries, k, exclude_ids)
        if len(self) == 0:
            return _no_results(queries, k)
        scores, rows = topk_dedup(queries, self.embeddings, k, threshold=threshold, exclude=exclude_rows)
        return scores, self._ids_of_rows(rows)

    # ------------------------------------------------------------------- FAISS
    def build_faiss_index(self, kind: str = "flat", *, num_lists: int | None = None,
                          num_subquantizers: int = 16, num_probes: int = 16, use_gpu: bool = False):
        """A FAISS inner-product index over the embeddings, used by :meth:`search_faiss`.

        kind: "flat" (IndexFlatIP, exact), "ivf" (IndexIVFFlat) or "ivfpq" (IndexIVFPQ,
        ``num_subquantizers`` codes of 8 bits, for memories too large to hold in fp32).
        num_lists defaults to ~4 sqrt(N), the usual IVF sizing. use_gpu needs faiss-gpu.
        """
        import faiss

        if kind not in FAISS_KINDS:
            raise ValueError(f"Memory.build_faiss_index: kind must be one of {FAISS_KINDS}, got {kind!r}")
        vectors = self.embeddings.detach().float().cpu().numpy()
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        else:
            num_lists = num_lists or max(1, int(4 * len(self) ** 0.5))
            quantizer = faiss.IndexFlatIP(self.dim)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, self.dim, num_lists, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFPQ(quantizer, self.dim, num_lists, num_subquantizers, 8,
                                         faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = num_probes
            self._faiss_quantizer = quantizer  # the index does not own its quantizer's Python wrapper
        index.add(vectors)
        if use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        self._faiss_index = index
        return index

    def search_faiss(self, queries: torch.Tensor, k: int, threshold: float = DEFAULT_THRESHOLD,
                     exclude_ids: torch.Tensor | None = None, pool: int | None = None):
        """Candidates from the FAISS index, then the exact filter over them.

        With a flat index the result equals :meth:`search` (the pool widens until the
        walk no longer depends on rows outside it); IVF / PQ candidates are approximate.
        """
        if self._faiss_index is None:
            raise RuntimeError("Memory.search_faiss: call build_faiss_index() first")
        queries, exclude_rows = self._prepare(queries, k, exclude_ids)
        if len(self) == 0:
            return _no_results(queries, k)
        pool = min(pool or FIRST_POOL_PER_K * k + FIRST_POOL_EXTRA, len(self))
        query_array = queries.detach().float().cpu().numpy()
        pending = torch.arange(queries.shape[0])
        scores = torch.full((queries.shape[0], k), float("-inf"))
        rows = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        while len(pending):
            _, candidates = self._faiss_index.search(query_array[pending.numpy()], pool)
            candidates = torch.from_numpy(candidates).to(torch.int64)
            still_short = []
            for position, query in enumerate(pending.tolist()):
                taken_scores, taken_rows, complete = _walk_candidates(
                    queries[query], self.embeddings, candidates[position], k, threshold,
                    None if exclude_rows is None else exclude_rows[query].cpu(),
                    truncated=pool < len(self))
                scores[query], rows[query] = taken_scores, taken_rows
                if not complete:
                    still_short.append(query)
            pending = torch.tensor(still_short, dtype=torch.int64)
            pool = min(2 * pool, len(self))
        return scores, self._ids_of_rows(rows)

    # ----------------------------------------------------------------- sharded
    def search_sharded(self, queries: torch.Tensor, k: int, threshold: float = DEFAULT_THRESHOLD,
                       exclude_ids: torch.Tensor | None = None, group=None, pool: int | None = None):
        """Exact search of a memory split across the ranks of ``group``; ``self`` is this rank's shard.

        Collective: every rank calls it, each with its own queries (b may differ per
        rank). Document ids must be unique across shards. Ties in score rank the
        row of the lower rank (then the lower local row) first, as if the shards
        were concatenated in rank order.

        Each rank sends, for every query of every rank, its best ``pool`` eligible
        rows (score <= threshold, not excluded) with their embeddings (all_gather);
        each rank then walks its own queries over the merged candidates. Rows
        ranked below the last candidate of a shard that had more eligible rows
        are not walked (rows of that shard could be missing there); a query left
        short by that doubles the pool on every rank and repeats.
        """
        import torch.distributed as dist

        rank = dist.get_rank(group)
        queries, _ = self._prepare(queries, k, None)
        device = self.embeddings.device
        batch_sizes = _all_gather_sizes(queries.shape[0], device, group)
        shard_sizes = _all_gather_sizes(len(self), device, group)
        row_offset = sum(shard_sizes[:rank])
        all_queries = _all_gather_padded(queries.float(), batch_sizes, group)
        all_exclude_rows = None
        if exclude_ids is not None:
            exclude_ids = torch.as_tensor(exclude_ids, dtype=torch.int64, device=device)
            exclude_ids = exclude_ids.reshape(queries.shape[0], -1)
            width = max(_all_gather_sizes(exclude_ids.shape[1], device, group))
            padded = torch.nn.functional.pad(exclude_ids, (0, width - exclude_ids.shape[1]), value=-1)
            all_exclude_rows = self.rows_of(_all_gather_padded(padded, batch_sizes, group, fill=-1))
        own = slice(sum(batch_sizes[:rank]), sum(batch_sizes[: rank + 1]))
        pool = pool or FIRST_POOL_PER_K * k + FIRST_POOL_EXTRA
        while True:
            scores, rows, truncated = _eligible_candidates(all_queries, self.embeddings, min(pool, len(self)),
                                                           threshold, all_exclude_rows)
            parts = (
                _pad_pool(scores, pool, float("-inf")),
                _pad_pool(torch.where(rows >= 0, rows + row_offset, rows), pool, -1),  # global rows
                _pad_pool(self._ids_of_rows(rows), pool, -1),
                _pad_pool(self.embeddings[rows.clamp(min=0)].float(), pool, 0.0),
                truncated,
            )
            # Every rank's candidates for this rank's queries: (b, world_size, pool, ...).
            merged = [torch.stack([shard[own] for shard in _all_gather_fixed(part, group)], dim=1)
                      for part in parts]
            out_scores, out_ids, short = _walk_merged(queries, *merged, k=k, threshold=threshold)
            needs_more = torch.tensor([int(short)], device=device)
            dist.all_reduce(needs_more, op=dist.ReduceOp.MAX, group=group)
            if not needs_more.item() or pool >= max(shard_sizes):
                return out_scores, out_ids
            pool *= 2


def _eligible_candidates(queries, embeddings, pool, threshold, exclude_rows):
    """The best ``pool`` rows per query that the walk could take, without the redundancy filter.

    queries: (B, d) fp32, embeddings: (N, d), exclude_rows: (B, E) or None.
    Returns scores (B, pool) fp32 best first, rows (B, pool) int64 (-1 = none) and
    truncated (B,) bool: more eligible rows exist than the pool holds.
    """
    batch = queries.shape[0]
    best_scores = torch.full((batch, 0), float("-inf"), device=queries.device)
    best_rows = torch.full((batch, 0), -1, dtype=torch.int64, device=queries.device)
    eligible = torch.zeros(batch, dtype=torch.int64, device=queries.device)
    for start in range(0, embeddings.shape[0], SHARD_ROWS_PER_CHUNK):
        chunk = embeddings[start : start + SHARD_ROWS_PER_CHUNK].float()
        scores = queries @ chunk.T
        # Compared in float64: the threshold is a Python float, not its fp32 rounding.
        keep = scores.double() <= threshold
        if exclude_rows is not None:
            local = exclude_rows - start
            inside = (local >= 0) & (local < chunk.shape[0])
            query_index, slot = inside.nonzero(as_tuple=True)
            keep[query_index, local[query_index, slot]] = False
        eligible += keep.sum(1)
        scores = scores.masked_fill(~keep, float("-inf"))
        rows = torch.arange(start, start + chunk.shape[0], device=queries.device).expand(batch, -1)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_rows = torch.cat([best_rows, torch.where(keep, rows, -1)], dim=1)
        best_scores, order = torch.topk(best_scores, min(pool, best_scores.shape[1]), dim=1)
        best_rows = best_rows.gather(1, order)
    best_rows = torch.where(best_scores > float("-inf"), best_rows, -1)
    return best_scores, best_rows, eligible > pool


def _walk_merged(queries, scores, rows, document_ids, embeddings, truncated, *, k, threshold):
    """The walk of each query over its merged shard candidates.

    queries: (b, d); scores, rows (global), document_ids: (b, S, P); embeddings: (b, S, P, d);
    truncated: (b, S) bool. Returns scores (b, k), document_ids (b, k) and whether a
    query was left short by a truncated shard (the caller widens the pool).
    """
    batch = queries.shape[0]
    out_scores = torch.full((batch, k), float("-inf"), device=queries.device)
    out_ids = torch.full((batch, k), -1, dtype=torch.int64, device=queries.device)
    short = False
    for query in range(batch):
        keep = rows[query] >= 0
        # A truncated shard's rows below its last candidate may be missing: walk only
        # candidates ranked at or before every truncated shard's last candidate.
        for shard in truncated[query].nonzero().flatten().tolist():
            last_score, last_row = scores[query, shard, -1], rows[query, shard, -1]
            keep &= (scores[query] > last_score) | ((scores[query] == last_score) & (rows[query] <= last_row))
        candidate_rows, order = torch.sort(rows[query][keep])  # lower global row first on ties
        if len(candidate_rows) == 0:
            short |= bool(truncated[query].any())
            continue
        candidate_embeddings = embeddings[query][keep][order]
        taken_scores, positions = topk_dedup(queries[query : query + 1], candidate_embeddings, k,
                                             threshold=threshold)
        positions = positions[0]
        out_scores[query] = taken_scores[0]
        out_ids[query] = torch.where(positions >= 0,
                                     document_ids[query][keep][order][positions.clamp(min=0)], -1)
        short |= bool(positions[-1] < 0) and bool(truncated[query].any())
    return out_scores, out_ids, short


def _pad_pool(tensor, pool, value):
    """Pad dim 1 of a (B, P, ...) tensor to ``pool`` so every rank gathers the same shape."""
    missing = pool - tensor.shape[1]
    if missing == 0:
        return tensor
    padding = torch.full((tensor.shape[0], missing, *tensor.shape[2:]), value,
                         dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, padding], dim=1)


def _all_gather_fixed(tensor, group):
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _all_gather_sizes(size: int, device, group) -> list[int]:
    return [int(part.item()) for part in _all_gather_fixed(torch.tensor([size], device=device), group)]


def _all_gather_padded(tensor, sizes, group, fill=0):
    """Concatenate every rank's (sizes[r], ...) tensor along dim 0."""
    padded = torch.full((max(sizes), *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    # One gathered part per rank and one size per rank: equal lengths by construction.
    parts = _all_gather_fixed(padded, group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _walk_candidates(query, embeddings, candidate_rows, k, threshold, exclude_rows=None,
                     truncated=False):
    """The greedy walk of one query over candidate rows (the exact filter of topk_dedup).

    query: (d,), embeddings: (N, d), candidate_rows: (C,) int64, -1 = none.
    Returns scores (k,), rows (k,) and whether the answer is complete: k taken, or the
    candidates were not truncated (they hold every eligible row of the memory).
    """
    valid = candidate_rows[candidate_rows >= 0]
    if exclude_rows is not None:
        valid = valid[~torch.isin(valid, exclude_rows[exclude_rows >= 0])]
    # Sorted by row, so that ties in score rank the lower row first as in topk_dedup.
    valid = torch.unique(valid)
    if len(valid) == 0:
        return torch.full((k,), float("-inf")), torch.full((k,), -1, dtype=torch.int64), not truncated
    device = embeddings.device
    scores, positions = topk_dedup(query[None].to(device), embeddings[valid.to(device)], k,
                                   threshold=threshold)
    positions = positions[0].cpu()
    rows = torch.where(positions >= 0, valid[positions.clamp(min=0)], positions)
    complete = bool(positions[-1] >= 0) or not truncated
    return scores[0].cpu(), rows, complete


def _no_results(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a search of an empty memory returns: every slot padded (-inf, -1)."""
    batch, device = queries.shape[0], queries.device
    return (torch.full((batch, k), float("-inf"), device=device),
            torch.full((batch, k), -1, dtype=torch.int64, device=device))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__
