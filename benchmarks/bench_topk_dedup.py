"""topk_dedup: ours vs the torch baseline a user would write (matmul + topk + Python filter).

    python -m benchmarks.bench_topk_dedup [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import mkfast
from benchmarks.common import Measurement, measure, run_suite


def setup(num_rows: int, dim: int, batch: int, dtype: torch.dtype, device: torch.device):
    """Unit-norm memory and queries, shared by every provider."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    memory = F.normalize(torch.randn(num_rows, dim, generator=generator), dim=-1).to(device=device, dtype=dtype)
    queries = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device=device, dtype=dtype)
    return queries, memory


def torch_baseline(queries, memory, k, threshold=0.9, pool=None):
    """What a user writes: exact scores, torch.topk of a pool, then the greedy filter in Python."""
    pool = min(pool or 4 * k, memory.shape[0])
    scores = queries.float() @ memory.float().T
    pool_scores, pool_indices = torch.topk(scores, pool, dim=1)
    results = []
    for query in range(queries.shape[0]):
        taken: list[int] = []
        for score, index in zip(pool_scores[query].tolist(), pool_indices[query].tolist()):
            if score > threshold:
                continue
            row = memory[index].float()
            if taken and bool((memory[taken].float() @ row > threshold).any()):
                continue
            taken.append(index)
            if len(taken) == k:
                break
        results.append(taken)
    return results


def main(quick: bool = False, device: str | None = None, output_root: str | None = None) -> None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    k, dim = 8, 768
    sizes = [(20_000, 1), (20_000, 64)] if quick else [(100_000, 1), (100_000, 64), (1_000_000, 1), (1_000_000, 64)]
    measurements = []
    for num_rows, batch in sizes:
        queries, memory = setup(num_rows, dim, batch, torch.float32, device)
        case = {"N": num_rows, "d": dim, "b": batch, "k": k}
        memory_bytes = {"gbps": memory.numel() * memory.element_size()}
        repetitions = 3 if quick else 5
        providers = {
            "read-once floor (memory.sum)": lambda: memory.sum(),
            "mkfast": lambda: mkfast.ops.topk_dedup(queries, memory, k),
            "torch": lambda: torch_baseline(queries, memory, k),
        }
        for provider, fn in providers.items():
            timings = measure(fn, device, warmup=1, repetitions=repetitions)
            measurements.append(Measurement(case, provider, timings, work=memory_bytes))
            print(f"{case} {provider}: {measurements[-1].median_ms:.2f} ms", flush=True)
    run_suite("topk_dedup", measurements, device, baseline="torch",
              notes="fp32 memory; rates count one read of the memory.", output_root=output_root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--output-root")
    arguments = parser.parse_args()
    main(quick=arguments.quick, device=arguments.device, output_root=arguments.output_root)
