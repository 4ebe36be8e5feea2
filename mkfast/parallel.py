"""Independent demo runs (seeds, splits) side by side, one process per CPU core.

The demo's models are so small that a second intra-op thread only spins (a run's ops take
microseconds), so the cores are used by running whole seeds at once instead: each worker
is a fresh process (spawn: no fork of a process holding OpenMP or Triton state) with one
intra-op thread. On a GPU, or with one worker, the runs go one after another in this
process, so a single-run result never depends on how many cores a machine has.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence

from mkfast.progress import quiet


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the workers)."""
    import resource

    return sum(usage.ru_utime + usage.ru_stime for usage in (resource.getrusage(resource.RUSAGE_SELF),
                                                             resource.getrusage(resource.RUSAGE_CHILDREN)))


def default_workers(runs: int) -> int:
    """One worker per usable core, never more than there are runs."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(runs, cores))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Inside the block torch and the BLAS under NumPy/scikit-learn run one thread each (restored
    after): on the demo's tiny ops a second thread only spins (measured on a busy 2-core box: 40
    MKS2 base steps 11 s of CPU with 2 torch threads, 0.7 s with 1; a probe's fit 3.5 s of CPU
    with 2 OpenBLAS threads, 0.17 s with 1)."""
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def _one_thread_call(payload: bytes) -> bytes:
    function, arguments = pickle.loads(payload)
    with quiet(), one_thread():
        return pickle.dumps(function(*arguments))


def run_in_processes(function: Callable, argument_lists: Sequence[tuple], workers: int | None = None,
                     device: str = "cpu") -> list:
    """``[function(*arguments) for arguments in argument_lists]``, in that order.

    ``function`` must be importable at module level (the workers import it by name) and its
    arguments and result picklable. On CPU with more than one worker, each call runs in its own
    process with one thread; ``workers=1`` or a CUDA ``device`` runs them here, in order.
    Progress lines from workers are silenced (they would interleave): a caller reports per
    finished run instead."""
    argument_lists = list(argument_lists)
    workers = default_workers(len(argument_lists)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"run_in_processes: workers must be >= 1, got {workers}")
    if workers == 1 or str(device).startswith("cuda") or len(argument_lists) <= 1:
        return [function(*arguments) for arguments in argument_lists]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        # Plain pickle bytes both ways: once torch.multiprocessing is imported, the pool's pickler
        # would pass every small tensor as a file descriptor, past the open-file limit.
        futures = [pool.submit(_one_thread_call, pickle.dumps((function, tuple(arguments))))
                   for arguments in argument_lists]
        return [pickle.loads(future.result()) for future in futures]
