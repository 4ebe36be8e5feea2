"""mkfast.parallel: independent runs in worker processes give what running them here gives."""

import pytest

from mkfast.parallel import default_workers, run_in_processes


def seeded_draw(seed: int, count: int) -> list[float]:
    import numpy  # noqa: F401  (loads the BLAS whose threads the workers must limit)
    import torch
    from threadpoolctl import threadpool_info

    blas_threads = max((pool["num_threads"] for pool in threadpool_info()), default=1)
    return torch.rand(count, generator=torch.Generator().manual_seed(seed)).tolist() + [
        float(torch.get_num_threads()), float(blas_threads)]


def test_processes_match_in_order_and_use_one_thread():
    arguments = [(seed, 3) for seed in (5, 1, 7)]
    here = [seeded_draw(*pair)[:3] for pair in arguments]
    results = run_in_processes(seeded_draw, arguments, workers=2)
    assert [row[:3] for row in results] == here
    assert all(row[3] == 1.0 and row[4] == 1.0 for row in results)


def test_one_worker_runs_here_and_bad_counts_fail():
    assert run_in_processes(seeded_draw, [(0, 2)], workers=1)[0][:2] == seeded_draw(0, 2)[:2]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_in_processes(seeded_draw, [(0, 2), (1, 2)], workers=0)
    assert 1 <= default_workers(5) <= 5
    assert default_workers(1) == 1


def tensor_count(tensors: list) -> int:
    return len(tensors)


def test_many_small_tensors_cross_with_torch_multiprocessing_imported():
    import torch
    import torch.multiprocessing  # noqa: F401  (registers the file-descriptor tensor reductions)

    tensors = [torch.zeros(2) for _ in range(25000)]  # past a 20000 open-file limit
    assert run_in_processes(tensor_count, [(tensors,), (tensors[:7],)], workers=2) == [25000, 7]


def test_one_thread_limits_torch_and_blas_then_restores_them():
    import numpy  # noqa: F401  (loads the BLAS)
    import torch
    from threadpoolctl import threadpool_info

    from mkfast.parallel import one_thread

    def blas_threads():
        return max((pool["num_threads"] for pool in threadpool_info()), default=1)

    before = (torch.get_num_threads(), blas_threads())
    with one_thread():
        assert (torch.get_num_threads(), blas_threads()) == (1, 1)
    assert (torch.get_num_threads(), blas_threads()) == before
