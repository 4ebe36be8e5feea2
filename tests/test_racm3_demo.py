"""The RA-CM3 digits demo in quick mode: runs end to end and reports both runs' held-out losses."""

import json
import math
import os

from mkfast.racm3.demo import run_demo


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
