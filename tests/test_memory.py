"""RA-CM3's retrieval memory: build, save/load, exact / FAISS / sharded search, all against
topk_dedup_reference."""

import os

import pytest
import torch
import torch.nn.functional as F

from mkfast.ops import topk_dedup_reference
from mkfast.racm3.memory import Memory

NUM_DOCUMENTS, DIM = 600, 48


def _embeddings_with_near_duplicates(num_rows=NUM_DOCUMENTS, dim=DIM, seed=0):
    """Unit rows, a third of them jittered copies of others, so the 0.9 filter fires."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(num_rows, dim, generator=generator), dim=-1)
    copies = torch.arange(num_rows) % 3 == 0
    sources = torch.randint(0, num_rows, (num_rows,), generator=generator)
    jitter = 0.05 * torch.randn(int(copies.sum()), dim, generator=generator)
    embeddings[copies] = F.normalize(embeddings[sources[copies]] + jitter, dim=-1)
    return embeddings


def _queries(embeddings, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    rows = embeddings[torch.randint(0, len(embeddings), (batch,), generator=generator)]
    return F.normalize(rows + 0.3 * torch.randn(rows.shape, generator=generator), dim=-1)


def _document_ids(num_rows):
    # Ids unrelated to row order, so a row/id mix-up cannot pass.
    return 1000 + torch.randperm(num_rows, generator=torch.Generator().manual_seed(2)) * 7


def _expected(embeddings, document_ids, queries, k, exclude_rows=None):
    scores, rows = topk_dedup_reference(queries, embeddings, k, 0.9, exclude_rows)
    return scores, torch.where(rows >= 0, document_ids[rows.clamp(min=0)], -1)


@pytest.fixture
def memory():
    embeddings = _embeddings_with_near_duplicates()
    return Memory.from_arrays(embeddings, _document_ids(len(embeddings)))


def test_exact_search_returns_reference_document_ids(memory):
    queries = _queries(memory.embeddings, 5)
    scores, ids = memory.search(queries, k=6)
    expected_scores, expected_ids = _expected(memory.embeddings, memory.document_ids, queries, 6)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores)


def test_exclude_ids_are_document_ids_not_rows(memory):
    queries = _queries(memory.embeddings, 3)
    _, plain_ids = memory.search(queries, k=4)
    exclude_ids = plain_ids[:, :1]  # each query's best document, e.g. its own in training
    _, ids = memory.search(queries, k=4, exclude_ids=exclude_ids)
    exclude_rows = memory.rows_of(exclude_ids)
    _, expected_ids = _expected(memory.embeddings, memory.document_ids, queries, 4, exclude_rows)
    assert torch.equal(ids, expected_ids)
    assert not (ids == exclude_ids).any()


def test_build_from_encoder_matches_from_arrays():
    embeddings = _embeddings_with_near_duplicates(50, 16)
    documents = [f"document {index}" for index in range(50)]
    calls = []

    def encoder(batch):
        calls.append(len(batch))
        return embeddings[[int(text.split()[1]) for text in batch]]

    memory = Memory.build(encoder, documents, batch_size=16, document_ids=range(100, 150),
                          show_progress=False)
    assert calls == [16, 16, 16, 2]
    assert torch.equal(memory.embeddings, embeddings)
    assert memory.document_ids.tolist() == list(range(100, 150))


def test_save_load_round_trip(memory, tmp_path):
    memory.save(tmp_path / "memory")
    loaded = Memory.load(tmp_path / "memory")
    assert torch.equal(loaded.embeddings, memory.embeddings)
    assert torch.equal(loaded.document_ids, memory.document_ids)


def test_interrupted_save_keeps_the_previous_memory(memory, tmp_path, monkeypatch):
    directory = tmp_path / "memory"
    memory.save(directory)
    smaller = Memory.from_arrays(memory.embeddings[:10], memory.document_ids[:10])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    # Killed after the new embeddings were written, before memory.json was replaced.
    monkeypatch.setattr("mkfast.racm3.memory_files.json.dump", crash)
    with pytest.raises(KeyboardInterrupt):
        smaller.save(directory)
    monkeypatch.undo()
    loaded = Memory.load(directory)
    assert torch.equal(loaded.document_ids, memory.document_ids)
    assert any(name.startswith(".saving-") for name in os.listdir(directory))  # what the crash left
    # A later save succeeds and removes the old file, the crashed save's orphan and its staging folder.
    smaller.save(directory)
    assert len(Memory.load(directory)) == 10
    assert sorted(name.split("-")[0] for name in os.listdir(directory)) == [".memory.lock", "embeddings",
                                                                          "memory.json"]


def test_invalid_memories_and_queries_are_refused(memory):
    with pytest.raises(ValueError, match="document_ids must be unique"):
        Memory.from_arrays(torch.randn(3, 4), [1, 1, 2])
    with pytest.raises(ValueError, match=r"document_ids must be int64 of shape \(3,\)"):
        Memory(torch.randn(3, 4), torch.arange(4))
    with pytest.raises(ValueError, match=r"queries must be \(b, 48\)"):
        memory.search(torch.randn(2, 8), k=2)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        memory.search(torch.randn(2, DIM), k=0)


@pytest.mark.parametrize("k", [1, 8])
def test_faiss_flat_candidates_with_widening_equal_exact_search(memory, k):
    pytest.importorskip("faiss")
    # Queries equal to memory rows: their near-copies score above 0.9 and are all
    # skipped, and a first pool of 1 candidate forces the widening loop.
    queries = torch.cat([memory.embeddings[:3], _queries(memory.embeddings, 3)])
    memory.build_faiss_index("flat")
    scores, ids = memory.search_faiss(queries, k=k, pool=1)
    expected_scores, expected_ids = memory.search(queries, k=k)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores)


def test_faiss_ivf_candidates_pass_the_same_filter(memory):
    pytest.importorskip("faiss")
    queries = _queries(memory.embeddings, 4)
    memory.build_faiss_index("ivf", num_lists=8, num_probes=8)  # every list probed: exact candidates
    _, ids = memory.search_faiss(queries, k=5, exclude_ids=memory.document_ids[:4, None])
    _, expected_ids = memory.search(queries, k=5, exclude_ids=memory.document_ids[:4, None])
    assert torch.equal(ids, expected_ids)


def _sharded_worker(rank, world_size, output_dir, pool):
    import torch.distributed as dist

    from mkfast.distributed import shutdown

    # A file rendezvous: no port to race for, and no store that dies with rank 0.
    dist.init_process_group("gloo", init_method=f"file://{output_dir}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        torch.set_num_threads(1)
        embeddings = _embeddings_with_near_duplicates()
        document_ids = _document_ids(len(embeddings))
        # Uneven shards in rank order; each rank has its own number of queries.
        bounds = [0, 250, len(embeddings)]
        own = slice(bounds[rank], bounds[rank + 1])
        shard = Memory.from_arrays(embeddings[own], document_ids[own])
        queries = torch.cat([embeddings[rank * 7 : rank * 7 + 2],
                             _queries(embeddings, 3 + rank, seed=10 + rank)])
        exclude_ids = document_ids[torch.arange(queries.shape[0]) * 5][:, None]
        scores, ids = shard.search_sharded(queries, k=6, exclude_ids=exclude_ids, pool=pool)
        torch.save({"queries": queries, "exclude_ids": exclude_ids, "scores": scores, "ids": ids},
                   os.path.join(output_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("pool", [None, 2])
def test_sharded_search_over_two_gloo_processes_equals_single_process(tmp_path, pool):
    # pool=2: the first candidates of each shard are mostly skipped rows, so the
    # truncated-shard boundary cuts the walk short and the pool must double.
    import torch.multiprocessing as multiprocessing

    multiprocessing.spawn(_sharded_worker, args=(2, str(tmp_path), pool), nprocs=2, join=True)
    memory = Memory.from_arrays(_embeddings_with_near_duplicates(), _document_ids(NUM_DOCUMENTS))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        expected_scores, expected_ids = memory.search(result["queries"], k=6,
                                                      exclude_ids=result["exclude_ids"])
        assert torch.equal(result["ids"], expected_ids), rank
        torch.testing.assert_close(result["scores"], expected_scores)


def test_search_of_an_empty_memory_returns_padding():
    empty = Memory(torch.zeros(0, DIM))
    scores, ids = empty.search(torch.randn(3, DIM), k=2)
    assert torch.equal(ids, torch.full((3, 2), -1))
    assert torch.equal(scores, torch.full((3, 2), float("-inf")))


def _small(memory, rows):
    return Memory.from_arrays(memory.embeddings[:rows], memory.document_ids[:rows])


def test_a_save_while_another_holds_the_lock_waits_or_fails_clearly(memory, tmp_path, monkeypatch):
    from mkfast.racm3.memory import MemoryLockedError

    directory = tmp_path / "memory"
    memory.save(directory)
    attempts = []

    def second_save(stage):
        if stage == "tensors_moved" and not attempts:
            attempts.append(stage)
            with pytest.raises(MemoryLockedError, match="another save to .* is in progress"):
                _small(memory, 5).save(directory, wait=False)

    monkeypatch.setattr("mkfast.racm3.memory_files.fault_point", second_save)
    _small(memory, 10).save(directory)
    assert attempts and len(Memory.load(directory)) == 10


def test_concurrent_saves_run_one_after_the_other(memory, tmp_path, monkeypatch):
    import threading

    directory = tmp_path / "memory"
    memory.save(directory)
    threads = []

    def start_second_save(stage):
        # Started while the first save holds the lock: it can only finish after the first one.
        if stage == "tensors_written" and not threads:
            threads.append(threading.Thread(target=_small(memory, 7).save, args=(directory,)))
            threads[0].start()

    monkeypatch.setattr("mkfast.racm3.memory_files.fault_point", start_second_save)
    _small(memory, 10).save(directory)
    threads[0].join()
    assert len(Memory.load(directory)) == 7
    assert sorted(name.split("-")[0] for name in os.listdir(directory)) == [".memory.lock", "embeddings",
                                                                          "memory.json"]


@pytest.mark.parametrize("saves_in_between", [1, 2])
def test_a_reader_never_sees_a_half_replaced_memory(memory, tmp_path, monkeypatch, saves_in_between):
    directory = tmp_path / "memory"
    memory.save(directory)
    pending = [_small(memory, 10 + index) for index in range(saves_in_between)]

    def save_between_index_and_tensors(stage):
        # The reader has read memory.json; saves replace the memory (and remove its file) now.
        while stage == "index_read" and pending:
            pending.pop(0).save(directory)

    monkeypatch.setattr("mkfast.racm3.memory_files.fault_point", save_between_index_and_tensors)
    loaded = Memory.load(directory)
    expected = 10 + saves_in_between - 1
    assert len(loaded) == expected
    assert torch.equal(loaded.embeddings, memory.embeddings[:expected])


def _save_repeatedly(directory, rounds):
    for index in range(rounds):
        embeddings = torch.full((50 + index % 7, DIM), float(index))
        Memory.from_arrays(embeddings).save(directory)


@pytest.mark.slow
def test_loads_racing_real_saves_in_other_processes_always_see_a_whole_memory(tmp_path):
    import multiprocessing

    directory = tmp_path / "memory"
    _save_repeatedly(directory, 1)
    # Two writers (the lock makes their saves take turns) and this process reading.
    writers = [multiprocessing.get_context("fork").Process(target=_save_repeatedly, args=(directory, 150))
               for _ in range(2)]
    for writer in writers:
        writer.start()
    loads = 0
    while any(writer.is_alive() for writer in writers) or loads == 0:
        memory = Memory.load(directory)
        # Each save writes one value everywhere and its own row count: a mix would show.
        assert len(memory) == 50 + int(memory.embeddings[0, 0]) % 7
        assert torch.equal(memory.embeddings, torch.full_like(memory.embeddings, memory.embeddings[0, 0]))
        loads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert loads > 1
    assert sorted(name.split("-")[0] for name in os.listdir(directory)) == [".memory.lock", "embeddings",
                                                                          "memory.json"]
