"""The RA-CM3 digits demo in quick mode: runs end to end and reports both runs' held-out losses."""

import json
import math
import os

import pytest

from mkfast.racm3.demo import run_demo
from mkfast.racm3.inference_demo import check_replay, load_demo_run
from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions


def test_quick_demo_reports_held_out_losses_of_both_runs(tmp_path):
    summary = run_demo(str(tmp_path), quick=True)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(summary))
    vocabulary_size = summary["vocabulary_size"]
    for name in ("retrieval", "no_retrieval"):
        run = summary["runs"][name]
        for key in ("held_out_image_token_loss", "held_out_caption_token_loss"):
            # Finite and below a uniform guess over the vocabulary: the generator learned something.
            assert 0 < run[key] < math.log(vocabulary_size)
        assert os.path.exists(tmp_path / name / "loss.png")
        assert os.path.exists(tmp_path / name / "metrics.jsonl")
    assert os.path.exists(tmp_path / "loss_comparison.png") and os.path.exists(tmp_path / "components.pt")
    # The no-retrieval run never saw a retrieved token; the retrieval run did.
    retrieval_records = [json.loads(line) for line in open(tmp_path / "retrieval" / "metrics.jsonl")]
    plain_records = [json.loads(line) for line in open(tmp_path / "no_retrieval" / "metrics.jsonl")]
    assert sum(record["retrieved_tokens"] for record in retrieval_records) > 0
    assert sum(record["retrieved_tokens"] for record in plain_records) == 0
    assert len(retrieval_records) == len(plain_records) == summary["generator_steps"]

    # A run dir without components.pt (older runs) gets them back by replaying the demo's stages.
    os.remove(tmp_path / "components.pt")
    run = load_demo_run(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert run["replayed_components"]
    train = run["train"]
    corpus = RetrievalCorpus(run["vocabulary"], run["encoder"], train.captions, train.images,
                             run["tokenizer"].encode(train.images))
    check = check_replay(run, corpus, SequenceOptions(max_sequence_length=256))
    assert check["matches"], check
    # A GPU run is not replayed on the CPU.
    os.remove(tmp_path / "components.pt")
    results = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({**results, "device": "cuda"}))
    with pytest.raises(FileNotFoundError, match="cannot be replayed"):
        load_demo_run(str(tmp_path))
