"""`mkfast train mks2-*` / `mkfast eval mks2`, the local BLIP-2 loader, and the quick digits demo."""

import json
import os

import pytest
import torch

from mkfast.cli import main as mkfast_main
from mkfast.data.digits import DIGIT_NAMES
from mkfast.mks2.adapters import read_adapter_config
from mkfast.mks2.commands import SHIPPED_SET
from mkfast.mks2.vision import load_blip2_vision_adapter, small_vision_adapter


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
    """A BLIP-2-layout directory (config.json + model.safetensors with vision_model./qformer./query_tokens
    and a language model's tensors that must be skipped) gives the same soft tokens as the adapter it came
    from."""
    from safetensors.torch import save_file
    from transformers import Blip2Config

    source = small_vision_adapter(language_hidden_size=24, image_size=16, seed=3)
    tensors = {f"vision_model.{name}": tensor for name, tensor in source.vision_model.state_dict().items()}
    tensors |= {f"qformer.{name}": tensor for name, tensor in source.qformer.state_dict().items()}
    tensors["query_tokens"] = source.query_tokens
    tensors["language_model.lm_head.weight"] = torch.zeros(2, 2)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()},
              str(tmp_path / "model.safetensors"))
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


SPLITS = range(8)


def test_colour_is_in_the_images_and_in_no_caption_or_pretraining_text():
    from mkfast.data.colour_digits import COLOUR_NAMES, colour_split, coloured_pairs, pretraining_texts
    from mkfast.data.digits import load_digits_pairs

    pairs, _ = load_digits_pairs(image_size=8, seed=0)
    for index in SPLITS:
        split = colour_split(index)
        coloured = coloured_pairs(pairs, split)
        texts = coloured.captions + pretraining_texts(coloured.captions)
        for text in texts:
            words = set(text.split())
            # A colour word may appear, never next to a digit: no text states a digit's colour.
            assert not (words & set(COLOUR_NAMES) and words & set(DIGIT_NAMES)), text
        # The images carry it: each class's mean red and blue ink order as its colour says.
        for digit in range(10):
            red, _, blue = coloured.images[coloured.labels == digit].mean(dim=(0, 2, 3)).tolist()
            assert (red > blue) == (split.colour_name(digit) == "red"), (index, digit)


def test_held_out_answers_are_balanced_so_any_constant_answer_scores_one_half():
    from mkfast.data.colour_digits import (
        COLOUR_NAMES,
        SPLITS_PER_CYCLE,
        colour_split,
        constant_answer_accuracy,
        held_out_questions,
        stage2_instructions,
    )

    for index in SPLITS:
        split = colour_split(index)
        items = held_out_questions(split)
        assert {constant_answer_accuracy(items, colour) for colour in COLOUR_NAMES} == {0.5}
        # The training classes are balanced too: their majority colour is no prior either.
        training_colours = [split.colour_of[digit] for digit in split.training_classes]
        assert training_colours.count(0) == training_colours.count(1) == 4
        prompts, responses = stage2_instructions(split)
        for digit in split.held_out:  # stage 2 never names a held-out class with a colour
            assert not any(DIGIT_NAMES[digit] in prompt.split() and response in COLOUR_NAMES
                           for prompt, response in zip(prompts, responses, strict=True))
    # A cycle asks about every class once; every split draws its own colouring (independent runs).
    cycles = [[colour_split(cycle * SPLITS_PER_CYCLE + position) for position in range(SPLITS_PER_CYCLE)]
              for cycle in range(2)]
    for splits in cycles:
        assert sorted(digit for split in splits for digit in split.held_out) == list(range(10))
    for splits in cycles:  # (two random colourings may coincide: 1 in 140)
        assert len({split.colour_of for split in splits}) > 1
    assert cycles[0][0].held_out != cycles[1][0].held_out


def test_attribute_share_is_one_for_attribute_only_features_and_one_ninth_on_average_by_chance():
    import itertools

    import numpy as np

    from mkfast.mks2.probes import attribute_share

    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(10), 3)
    attribute = {digit: int(digit in (1, 4, 5, 7, 8)) for digit in range(10)}
    direction = rng.normal(size=6)
    only_attribute = np.stack([direction * (2 * attribute[digit] - 1) for digit in classes])
    assert attribute_share(only_attribute, classes, attribute) == pytest.approx(1.0)
    # Over every five/five labelling of ten classes the share averages (groups - 1) / (classes - 1).
    features = rng.normal(size=(30, 6))
    shares = [attribute_share(features, classes, {digit: int(digit in half) for digit in range(10)})
              for half in itertools.combinations(range(10), 5)]
    assert np.mean(shares) == pytest.approx(1 / 9)


def test_class_held_out_probe_reads_a_shared_direction_on_classes_it_never_saw():
    import numpy as np

    from mkfast.mks2.probes import class_held_out_probe

    rng = np.random.default_rng(1)
    classes = np.repeat(np.arange(10), 5)
    colour = np.array([digit % 2 for digit in classes])
    # Each class its own offset, a direction shared by the attribute as large, a little noise.
    offsets = rng.normal(size=(10, 32))
    shared = rng.normal(size=32)
    features = offsets[classes] + np.outer(2 * colour - 1, shared) + rng.normal(size=(50, 32)) * 0.1
    train = classes < 8
    probe = class_held_out_probe(features[train], colour[train], classes[train])
    assert probe.score(features[~train], colour[~train]) == 1.0
    with pytest.raises(ValueError, match="one row each"):
        class_held_out_probe(features[train], colour[train][:-1], classes[train])
    one_odd_class = np.isin(classes, [0, 1, 2, 4])  # a single class of colour 1: no fold can hold one out
    with pytest.raises(ValueError, match="two classes each"):
        class_held_out_probe(features[one_odd_class], colour[one_odd_class], classes[one_odd_class])


def test_inst_lora_starts_as_the_plain_model_and_trains_only_lora():
    from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
    from mkfast.mks2.build import SmallLlamaConfig, small_llama
    from mkfast.mks2.inst_lora import LoRALinear, apply_inst_lora

    tokenizer = word_level_tokenizer(demo_vocabulary())
    config = SmallLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    plain = small_llama(config, tokenizer, seed=1)
    wrapped = apply_inst_lora(small_llama(config, tokenizer, seed=1), rank=4, alpha=8)
    input_ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(plain(input_ids=input_ids).logits, wrapped(input_ids=input_ids).logits)
    trainable = {name for name, parameter in wrapped.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert sum(isinstance(module, LoRALinear) for module in wrapped.modules()) == 7 * config.num_hidden_layers


@pytest.mark.slow
def test_tiny_demo_trains_every_arm_on_the_same_instructions_and_reports_claims(tmp_path):
    from mkfast.mks2.demo import ARMS, CLAIM, run_demo

    settings = {"pretrain_steps": 1, "vision_pretrain_steps": 1, "stage1_steps": 1, "stage2_steps": 1,
                "repeat_seeds": (1,)}
    summary = run_demo(str(tmp_path), settings=settings, workers=2)  # the two runs in two processes
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "loss.png")
    for run in summary["runs"]:
        assert set(run["stage2_data_digest"]) == set(ARMS)
        assert len(set(run["stage2_data_digest"].values())) == 1
    assert [run["split"] for run in summary["runs"]] == [0, 1]
    assert summary["claims"][0]["claim"] == CLAIM and summary["claims"][0]["seeds"] == 2
    for arm in ARMS:
        assert summary["results"][arm]["held_out_text_questions"]["per_run"] == [
            run["results"][arm]["held_out"]["acc"] for run in summary["runs"]]
    assert set(summary["probe"]) == {"mks2", "shuffled_pairs", "no_stage1"}
    assert ("note" in summary) == (not summary["probe_reads_held_out_colour"])
    probes = [run["probe"] for run in summary["runs"]]
    assert summary["probe_gain_over_no_stage1"]["per_run"] == [
        probe["mks2"]["held_out_acc"] - probe["no_stage1"]["held_out_acc"] for probe in probes]
    shares = {f"{part}_{arm}" for part in ("hidden", "head") for arm in summary["probe"]}
    assert set(summary["colour_share"]) == {"image_features", *shares}
    assert all(0.0 <= run["probe"]["mks2"]["colour_share_hidden"] <= 1.0 for run in summary["runs"])
    # Every random draw comes from the run's seed: neither the global generator's state before nor the
    # process a run goes to (a worker above, this one here) changes a result.
    torch.manual_seed(12345)
    again = run_demo(str(tmp_path / "again"), settings={**settings, "repeat_seeds": ()})
    assert again["runs"][0]["final_losses"] == summary["runs"][0]["final_losses"]
    assert again["runs"][0]["probe"] == summary["runs"][0]["probe"]
