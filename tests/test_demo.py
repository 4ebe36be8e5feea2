"""`mkfast demo --quick`: every stage runs on the digits set and the outputs a newcomer opens exist."""

import json
import os

from mkfast.cli import main as mkfast_main

# The budget for the quick demo on 2 CPU cores; CI gets a margin for a loaded machine.
QUICK_BUDGET_SECONDS = 180


def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    output_dir = tmp_path / "demo_out"
    mkfast_main(["demo", "--quick", "--output-dir", str(output_dir)])
    printed = capsys.readouterr().out
    results = json.loads((output_dir / "results.json").read_text())
    for stage in ("environment", "racm3", "racm3_inference", "mks2", "kernels"):
        assert "error" not in results[stage], (stage, results[stage])
    for name in ("racm3/loss_comparison.png", "racm3_inference/text_to_image_grid.png", "mks2/loss.png",
                 "benchmarks/cpu/topk_dedup.json", "benchmarks/cpu/e2e_racm3.png", "index.html"):
        assert os.path.exists(output_dir / name), name
    index = (output_dir / "index.html").read_text()
    assert "racm3_inference/text_to_image_grid.png" in index
    # The printed table carries the comparisons the demo exists for.
    for row in ("RA-CM3 held-out image-token loss, no retrieval", "MKS2 held-out text questions acc, baseline",
                "benchmark speedup over the baseline (geomean), topk_dedup vs torch · mkfast"):
        assert row in printed, row
    assert results["seconds"] < QUICK_BUDGET_SECONDS
