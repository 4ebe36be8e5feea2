"""`mkfast train mks2-*` / `mkfast eval mks2`, the local BLIP-2 loader, and the quick digits demo."""

import json
import os

import torch

from mkfast.cli import main as mkfast_main
from mkfast.mks2.adapters import read_adapter_config
from mkfast.mks2.commands import SHIPPED_SET
from mkfast.mks2.vision import load_blip2_vision_adapter, small_vision_adapter

DEMO_BUDGET_SECONDS = 60


def test_train_stage1_stage2_then_eval_from_the_command_line(tmp_path, capsys):
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    common = ["--steps", "2", "--batch-size", "4", "--learning-rate", "1e-3"]
    mkfast_main(["train", "mks2-stage1", "--output-dir", stage1, *common])
    assert read_adapter_config(os.path.join(stage1, "adapters"))["stage"] == "visual_memory"
    config_file = tmp_path / "stage2.json"
    config_file.write_text(json.dumps({"adapters_from": os.path.join(stage1, "adapters"), "lora_rank": 4}))
    mkfast_main(["train", "mks2-stage2", "--config", str(config_file), "--output-dir", stage2, *common])
    saved = read_adapter_config(os.path.join(stage2, "adapters"))
    assert saved["stage"] == "momes" and saved["lora_rank"] == 4
    for name in ("metrics.jsonl", "loss.png", "checkpoint_00000002.pt"):
        assert os.path.exists(os.path.join(stage2, name)), name
    capsys.readouterr()
    mkfast_main(["eval", "mks2", "--adapters", os.path.join(stage2, "adapters"), "--limit", "5",
                 "--tasks", f"jsonl:{SHIPPED_SET}"])
    scores = json.loads(capsys.readouterr().out)
    assert scores["jsonl:mks2_digits_multiple_choice.jsonl"]["items"] == 5


def test_shipped_set_has_a_few_hundred_valid_items():
    from mkfast.data.multiple_choice import load_multiple_choice_jsonl

    items = load_multiple_choice_jsonl(SHIPPED_SET)
    assert len(items) >= 150
    assert {len(item["choices"]) for item in items} == {2, 4}


def test_shipped_set_is_what_multiple_choice_set_builds_from_the_digits():
    """The shipped JSONL is generated data: its generator, over the training digits' ink, rebuilds it item
    for item (a change to either shows here)."""
    from mkfast.data.digit_instructions import ink_per_digit, multiple_choice_set
    from mkfast.data.digits import load_digits_pairs
    from mkfast.data.multiple_choice import load_multiple_choice_jsonl

    train, _ = load_digits_pairs(image_size=32, seed=0)
    assert multiple_choice_set(ink_per_digit(train)) == load_multiple_choice_jsonl(SHIPPED_SET)


def test_blip2_parts_load_from_a_local_checkpoint_directory(tmp_path):
    """A BLIP-2-layout directory (config.json + model.safetensors with vision_model./qformer./query_tokens and
    a language model's tensors that must be skipped) gives the same soft tokens as the adapter it came from."""
    from safetensors.torch import save_file
    from transformers import Blip2Config

    source = small_vision_adapter(language_hidden_size=24, image_size=16, seed=3)
    tensors = {f"vision_model.{name}": tensor for name, tensor in source.vision_model.state_dict().items()}
    tensors |= {f"qformer.{name}": tensor for name, tensor in source.qformer.state_dict().items()}
    tensors["query_tokens"] = source.query_tokens
    tensors["language_model.lm_head.weight"] = torch.zeros(2, 2)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp_path / "model.safetensors"))
    Blip2Config(vision_config=source.vision_model.config.to_dict(),
                qformer_config=source.qformer.config.to_dict()).save_pretrained(str(tmp_path))
    loaded = load_blip2_vision_adapter(str(tmp_path), language_hidden_size=24)
    loaded.projection.load_state_dict(source.projection.state_dict())
    images = torch.rand(2, 3, 16, 16)
    expected_tokens, expected_global = source.encode(images)
    tokens, global_features = loaded.encode(images)
    assert torch.equal(tokens, expected_tokens) and torch.equal(global_features, expected_global)
    assert tokens.shape == (2, 32, 24)
    assert not any(parameter.requires_grad for parameter in loaded.vision_model.parameters())


def test_quick_demo_compares_mks2_with_the_baseline(tmp_path):
    from mkfast.mks2.demo import run_demo

    summary = run_demo(str(tmp_path), quick=True)
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "loss.png")
    for name in ("mks2", "baseline"):
        scores = summary["results"][name]["held_out_text_questions"]
        assert scores["items"] == 48 and 0.0 <= scores["acc"] <= 1.0
    assert (summary["results"]["mks2"]["stage2_trainable_parameters"]
            == summary["results"]["baseline"]["stage2_trainable_parameters"])
    # The budget holds on an idle 2-core machine; a loaded CI box gets twice the margin before failing.
    assert summary["seconds"]["total"] < 2 * DEMO_BUDGET_SECONDS
