"""topk_dedup: ours vs what a user would write (torch, FAISS), plus the read-once floor.

Providers, all on the same inputs from `setup`:
  read-once floor   memory.sum(): the time to read the memory once (bandwidth bound);
  mkfast            mkfast.ops.topk_dedup (auto backend; on a GPU also "mkfast cuda", the csrc kernel);
  torch             matmul + torch.topk of a 4k pool + the greedy filter in Python;
  faiss             IndexFlatIP search of the same 4k pool + the same Python filter
                    (index built once per memory, outside the timing).
Providers are interleaved call by call, so a machine whose load changes during
the run slows all of them alike.

    python -m benchmarks.bench_topk_dedup [--quick]
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import mkfast
from mkfast.ops.topk_dedup import REDUNDANCY_THRESHOLD

from .common import Measurement, command_line, interleaved_timings, resolve_device, run_suite

DIM = 768  # CLIP ViT-L/14 embeddings (SPEC.md, "Retriever")
THRESHOLD = REDUNDANCY_THRESHOLD
# Candidate pool of the baselines: 4k, what a user picks to leave room for skipped rows.
POOL_PER_K = 4
# (N, b, k) per device. CPU: the CPU target cases of docs/performance.md (N=1e6, b in {1, 64}, k=8)
# and the b / k grid at N=1e5, sized to finish in minutes on 2 shared cores
# (N=1e6 at b=256 took too long to repeat there); GPU: up to N=1e7 in bf16 (15 GiB).
CPU_CASES = [(100_000, batch, 8) for batch in (1, 64, 256)] + [(100_000, 64, k) for k in (2, 16)] + [
    (1_000_000, batch, 8) for batch in (1, 64)
]
GPU_CASES = [(num_rows, batch, k) for num_rows in (1_000_000, 10_000_000)
             for batch in (1, 64, 256) for k in (8, 16)]
QUICK_CASES = [(20_000, 1, 8), (20_000, 64, 8)]
# main(cases=...): "target" is the GPU target's shape (N=1e7, d=768, k=8, b=1/64/256);
# "tiny" a dry run's.
CASE_SETS = {"target": [(10_000_000, batch, 8) for batch in (1, 64, 256)],
             "tiny": [(2_000, 1, 8), (2_000, 4, 8)]}


def setup(num_rows: int, dim: int, batch: int, dtype: torch.dtype, device: torch.device):
    """Unit-norm memory and queries, shared by every provider."""
    # Drawn on the memory's device: on the host, 1e5 x 768 normals took 1.5 s (+0.8 s to normalise) on
    # the shared 2-core CPU, so a 1e7-row memory would spend minutes there before any timing.
    generator = torch.Generator(device=device).manual_seed(0)
    memory = torch.empty(num_rows, dim, dtype=dtype, device=device)
    for start in range(0, num_rows, 1_000_000):  # built in slices: no fp32 copy of a 1e7-row memory
        rows = min(1_000_000, num_rows - start)
        normals = torch.randn(rows, dim, generator=generator, device=device)
        memory[start : start + rows] = F.normalize(normals, dim=-1).to(dtype)
    queries = F.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=-1).to(dtype)
    return queries, memory


def python_filter(memory, pool_scores, pool_indices, k, threshold=THRESHOLD):
    """The greedy walk over each query's ranked pool, as a user writes it in Python."""
    results = []
    for query in range(pool_scores.shape[0]):
        taken: list[int] = []
        for score, index in zip(pool_scores[query].tolist(), pool_indices[query].tolist(), strict=True):
            if index < 0 or score > threshold:
                continue
            row = memory[index].float()
            if taken and bool((memory[taken].float() @ row > threshold).any()):
                continue
            taken.append(index)
            if len(taken) == k:
                break
        results.append(taken)
    return results


def torch_baseline(queries, memory, k, threshold=THRESHOLD):
    """Exact scores (in the memory's dtype, as `queries @ memory.T` gives), torch.topk of a pool, filter."""
    scores = (queries.to(memory.dtype) @ memory.T).float()
    pool_scores, pool_indices = torch.topk(scores, min(POOL_PER_K * k, memory.shape[0]), dim=1)
    return python_filter(memory, pool_scores, pool_indices, k, threshold)


def faiss_index(memory):
    """IndexFlatIP over the memory (GPU index when faiss-gpu is installed and memory is on a GPU)."""
    import faiss

    # faiss-cpu 1.15 ships a BLAS threshold of 128000 queries, so a batch of 64 took its
    # per-query path: 690 ms vs 51 ms with BLAS at N=1e5 (measured here). 20, the value
    # FAISS long documented, gives every batch size its faster path.
    faiss.cvar.distance_compute_blas_threshold = 20
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(memory.float().cpu().numpy())
    if memory.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), memory.device.index or 0, index)
    return index


def faiss_baseline(index, queries, memory, k, threshold=THRESHOLD):
    pool_scores, pool_indices = index.search(queries.float().cpu().numpy(),
                                             min(POOL_PER_K * k, memory.shape[0]))
    return python_filter(memory, torch.from_numpy(pool_scores), torch.from_numpy(pool_indices), k, threshold)


def _providers(queries, memory, k, index, device):
    providers = {
        "read-once floor (memory.sum)": lambda: memory.sum(),
        "mkfast": lambda: mkfast.ops.topk_dedup(queries, memory, k, threshold=THRESHOLD),
    }
    if device.type == "cuda":
        def cuda_provider():
            with mkfast.use_backend("cuda"):
                return mkfast.ops.topk_dedup(queries, memory, k, threshold=THRESHOLD)

        providers["mkfast cuda"] = cuda_provider
    providers["torch"] = lambda: torch_baseline(queries, memory, k)
    if index is not None:
        providers["faiss"] = lambda: faiss_baseline(index, queries, memory, k)
    return providers


def main(quick: bool = False, device: str | None = None, output_root: str | None = None,
         cases: str = "default") -> None:
    device = resolve_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_cases = QUICK_CASES if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    cases = default_cases if cases == "default" else CASE_SETS[cases]
    has_faiss = importlib.util.find_spec("faiss") is not None
    measurements = []
    for num_rows in dict.fromkeys(num_rows for num_rows, _, _ in cases):
        _, memory = setup(num_rows, DIM, 1, dtype, device)
        # faiss holds an fp32 copy; skip it where that copy would not fit beside the memory.
        index = faiss_index(memory) if has_faiss and num_rows * DIM * 4 <= 8 * 2**30 else None
        for _, batch, k in [case for case in cases if case[0] == num_rows]:
            # One memory per N, shared by its cases; queries seeded by b.
            generator = torch.Generator().manual_seed(batch)
            queries = F.normalize(torch.randn(batch, DIM, generator=generator), dim=-1)
            queries = queries.to(device=device, dtype=dtype)
            case = {"N": num_rows, "d": DIM, "b": batch, "k": k, "dtype": str(dtype).removeprefix("torch.")}
            providers = _providers(queries, memory, k, index, device)
            timings = interleaved_timings(providers, device, warmup_rounds=1, repetitions=3)
            for name in providers:
                measurements.append(Measurement(case, name, timings[name],
                                                work={"gbps": memory.numel() * memory.element_size()}))
                print(f"{case} {name}: {measurements[-1].median_ms:.2f} ms", flush=True)
        del index, memory
    run_suite("topk_dedup", measurements, device, baseline="torch",
              notes=(f"{dtype} memory, unit-norm random rows, threshold {THRESHOLD}; rates count one read of "
                     "the memory. Providers interleaved call by call; median of 3 repetitions "
                     "(the JSON keeps each). "
                     "torch and faiss take a 4k pool then filter in Python (no widening)."),
              output_root=output_root)


if __name__ == "__main__":
    command_line(main, __doc__)
