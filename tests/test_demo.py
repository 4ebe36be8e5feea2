"""`mkfast demo --quick`: every stage runs on the digits set and the outputs a newcomer opens exist."""

import json
import os

import pytest
import torch

from mkfast.cli import main as mkfast_main
from mkfast.demo import demo_device
from mkfast.mks2.demo import FULL as MKS2_FULL
from mkfast.mks2.demo import GPU_FULL as MKS2_GPU_FULL
from mkfast.mks2.demo import QUICK as MKS2_QUICK
from mkfast.mks2.demo import demo_settings
from mkfast.racm3.demo import FULL as RACM3_FULL
from mkfast.racm3.demo import GPU_FULL as RACM3_GPU_FULL
from mkfast.racm3.demo import QUICK as RACM3_QUICK
from mkfast.racm3.demo import demo_sizes


@pytest.mark.slow
# Deprecations reached through our own calls into transformers, torch or open_clip are errors here.
@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    output_dir = tmp_path / "demo_out"
    mkfast_main(["demo", "--quick", "--output-dir", str(output_dir)])
    printed = capsys.readouterr().out
    results = json.loads((output_dir / "results.json").read_text())
    for stage in ("environment", "racm3", "racm3_inference", "mks2", "kernels"):
        assert "error" not in results[stage], (stage, results[stage])
    device = demo_device("auto")
    assert results["device"] == results["racm3"]["device"] == results["mks2"]["device"] == str(device)
    if device.type == "cuda":  # the GPU mode runs the fused kernels
        assert results["racm3"]["attention_implementation"] == "mkfast"
        assert results["racm3_inference"]["attention_implementation"] == "mkfast"
        assert results["mks2"]["mome_ffn_backend"] == "triton"
    benchmarks = f"benchmarks/{_device_tag()}"
    for name in ("racm3/loss_comparison.png", "racm3_inference/text_to_image_grid.png", "mks2/loss.png",
                 f"{benchmarks}/topk_dedup.json", f"{benchmarks}/e2e_racm3.png", "index.html"):
        assert os.path.exists(output_dir / name), name
    index = (output_dir / "index.html").read_text()
    assert "racm3_inference/text_to_image_grid.png" in index
    assert index.index("id='headline'") < index.index("RA-CM3 held-out image-token loss, no retrieval")
    for number, stage in enumerate(("environment", "racm3", "racm3_inference", "mks2", "kernels"), start=1):
        assert f"== demo stage {number}/5: {stage} done in" in printed, stage
    # The printed table carries the comparisons the demo exists for.
    for row in ("RA-CM3 held-out image-token loss, no retrieval",
                "MKS2 held-out text questions acc, baseline",
                "benchmark speedup over the baseline (geomean), topk_dedup vs torch · mkfast"):
        assert row in printed, row


def _device_tag() -> str:
    from mkfast.benchmarks.common import device_tag

    return device_tag()


def test_full_settings_grow_on_a_gpu_and_quick_ones_do_not():
    assert demo_sizes(quick=True, device="cuda") is RACM3_QUICK
    assert demo_sizes(quick=False, device="cpu") is RACM3_FULL
    gpu = demo_sizes(quick=False, device="cuda")
    assert gpu is RACM3_GPU_FULL
    assert gpu.generator_steps > RACM3_FULL.generator_steps and gpu.batch_size > RACM3_FULL.batch_size
    assert gpu.generator.hidden_size > RACM3_FULL.generator.hidden_size
    from mkfast.racm3.generator import build_generator

    model = build_generator(400, gpu.generator)  # the GPU run's generator is a valid model
    assert model(input_ids=torch.randint(0, 400, (1, 16)), use_cache=False).logits.shape == (1, 16, 400)
    assert sum(parameter.numel() for parameter in model.parameters()) < 6e6  # "~5M" as documented
    assert demo_settings(quick=True, device="cuda") is MKS2_QUICK
    assert demo_settings(quick=False, device="cpu") is MKS2_FULL
    assert len(demo_settings(quick=False, device="cuda")["repeat_seeds"]) > len(MKS2_FULL["repeat_seeds"])
    assert demo_settings(quick=False, device="cuda") is MKS2_GPU_FULL


def test_demo_device_auto_picks_the_gpu_only_where_there_is_one():
    assert demo_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert demo_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        demo_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_demo_asked_for_cuda_without_one_exits_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        mkfast_main(["demo", "--quick", "--device", "cuda", "--output-dir", str(tmp_path)])
    assert not os.path.exists(tmp_path / "results.json")


def test_result_folders_and_peaks_tell_the_h100_parts_apart(monkeypatch):
    from mkfast.benchmarks.common import DEVICE_PEAKS, device_tag

    for name, tag in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"),
                      ("NVIDIA H100 NVL", "h100_nvl"), ("NVIDIA H200", "h200")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert device_tag("cuda") == tag and tag in DEVICE_PEAKS
    assert device_tag("cpu") == "cpu"


def test_stages_hand_the_report_their_tables():
    from mkfast.demo import _mks2_report, _racm3_inference_report

    held_out = {"held_out": {"acc": 0.75}}
    run = {"seed": 0, "held_out_classes": [5, 6], "probe": {"mks2": {"held_out_acc": 0.6}},
           "results": {"mks2": held_out, "baseline": {"held_out": {"acc": 0.5}}}}
    mks2 = _mks2_report({"runs": [run]})
    assert mks2["tables"][0]["columns"][2:] == ["mks2", "baseline", "probe (MKS2 arm)"]
    assert mks2["tables"][0]["rows"] == [[0, "5, 6", 0.75, 0.5, 0.6]]
    judged = {"memory_only": {"text_to_image": {"judge_accuracy_best": 0.2},
                              "image_to_text": {"class_accuracy": 0.1}}}
    examples = {"examples": [["a handwritten digit seven", "a digit one"]]}
    first_seed = {"racm3_k2": {"memory_only": {"image_to_text": examples}}}
    k_shot = {"ensemble_accuracy": {1: 0.5, 8: 0.7}}
    inference = _racm3_inference_report({"racm3_k2": judged, "k_shot": k_shot, "per_seed": [first_seed]})
    titles = [table["title"] for table in inference["tables"]]
    assert len(titles) == 3 and titles[1].startswith("k-shot")
    assert inference["tables"][1]["rows"] == [[1, 0.5], [8, 0.7]]
    assert inference["figures"][0]["path"] == "racm3_inference/text_to_image_grid.png"
