"""MKS2 training: frozen weights stay bit-identical, stage losses, resume, generation, 2-process gloo."""

import json
import os

import pytest
import torch
import torch.multiprocessing as multiprocessing

from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
from mkfast.mks2.build import SmallLlamaConfig, build_mks2, small_llama
from mkfast.mks2.evaluation import evaluate_multiple_choice, generate_text
from mkfast.mks2.stages import CaptionData, InstructionData, prepare_stage2, stage1_loss_fn, stage2_loss_fn
from mkfast.mks2.trainer import Trainer, TrainerConfig
from mkfast.training import latest_checkpoint, read_metrics

IMAGE_SIZE = 16
CAPTIONS = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two",
            "a handwritten digit nine"]
INSTRUCTIONS = InstructionData(
    prompts=["[INST] which digit is shown ? [/INST]", "[INST] what is one plus two ? [/INST]",
             "[INST] what is two plus the digit shown ? [/INST]"],
    responses=["seven", "three", "nine"], image_indices=[1, None, 1],
    images=torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE))


def _tiny_mks2(seed=0):
    tokenizer = word_level_tokenizer(demo_vocabulary())
    config = SmallLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    return build_mks2(small_llama(config, tokenizer, seed=seed), image_size=IMAGE_SIZE, seed=seed), tokenizer


def _snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _frozen_names(model):
    return [name for name, parameter in model.named_parameters() if not parameter.requires_grad]


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_step_leaves_every_frozen_weight_bit_identical(stage, tmp_path):
    model, tokenizer = _tiny_mks2()
    if stage == 1:
        images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
        loss_fn = stage1_loss_fn(model, tokenizer, CaptionData(images, CAPTIONS), 4)
    else:
        prepare_stage2(model, rank=4, alpha=8)
        loss_fn = stage2_loss_fn(model, tokenizer, INSTRUCTIONS, 3)
    frozen = _frozen_names(model)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    before = _snapshot(model)
    Trainer(model, loss_fn, TrainerConfig(output_dir=str(tmp_path), steps=2, learning_rate=1e-2,
                                          progress=False)).train(resume=False)
    after = model.state_dict()
    assert frozen and all(torch.equal(after[name], before[name]) for name in frozen)
    assert any(not torch.equal(after[name], before[name]) for name in trainable)
    if stage == 1:
        assert all(".visual_memory." in name for name in trainable if name.startswith("language_model."))
        assert any(name.startswith("language_model.model.layers.0.self_attn") for name in frozen)
    else:
        assert all("_lora_" in name or ".router." in name for name in trainable)


def test_stage1_losses_are_captioning_plus_infonce():
    model, tokenizer = _tiny_mks2()
    from mkfast.mks2.samples import caption_sample

    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    losses = model.stage1_losses([caption_sample(tokenizer, caption) for caption in CAPTIONS], images)
    assert torch.allclose(losses["loss"], losses["captioning"] + losses["text_to_image"])
    features = model.vision.frozen_features(images)
    again = model.stage1_losses([caption_sample(tokenizer, caption) for caption in CAPTIONS], features)
    assert torch.allclose(again["loss"], losses["loss"]), "precomputed image features change the loss"


def test_stage2_targets_are_the_response_and_eos_only():
    model, tokenizer = _tiny_mks2()
    from mkfast.mks2.samples import instruction_sample

    sample = instruction_sample(tokenizer, "[INST] what is one plus two ? [/INST]", "three")
    targets = [token for token, scored in zip(sample.token_ids, sample.loss_mask, strict=True) if scored]
    assert targets == tokenizer("three", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_trainer_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    def run(directory, stops):
        model, tokenizer = _tiny_mks2()
        loss_fn = stage1_loss_fn(model, tokenizer, CaptionData(INSTRUCTIONS.images, CAPTIONS), 3)
        for steps in stops:
            Trainer(model, loss_fn, TrainerConfig(output_dir=str(directory), steps=steps, learning_rate=1e-2,
                                                  checkpoint_every=2, progress=False)).train(resume=True)
        return model
    straight = run(tmp_path / "straight", [4])
    resumed = run(tmp_path / "resumed", [2, 4])
    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values(),
                                        strict=True):
        assert torch.equal(actual, expected), name
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert os.path.exists(tmp_path / "resumed" / "loss.png")


def test_greedy_and_beam_generation_with_and_without_an_image():
    model, tokenizer = _tiny_mks2()
    prompts = ["[INST] which digit is shown ? [/INST]", "[INST] what is one plus two ? [/INST]"]
    greedy = generate_text(model, tokenizer, prompts, INSTRUCTIONS.images[:2], num_beams=1, max_new_tokens=3)
    beam = generate_text(model, tokenizer, prompts, num_beams=4, max_new_tokens=3)
    assert len(greedy) == len(beam) == 2 and all(isinstance(text, str) for text in greedy + beam)
    from mkfast.mks2.samples import prompt_sample

    new_tokens = model.generate([prompt_sample(tokenizer, prompts[1])], max_new_tokens=3, num_beams=1)
    # Greedy decoding = argmax of the model's own next-token distribution.
    logits, _ = model.forward_logits([prompt_sample(tokenizer, prompts[1])])
    assert int(new_tokens[0, 0]) == int(logits[0, -1].argmax())


def test_multiple_choice_accuracy_is_one_when_the_answer_is_what_the_model_prefers():
    model, tokenizer = _tiny_mks2()
    from mkfast.mks2.evaluation import choice_log_likelihoods

    question, choices = "[INST] what is one plus two ? [/INST]", ["three", "four", "nine"]
    preferred = int(choice_log_likelihoods(model, tokenizer, question, choices).argmax())
    scores = evaluate_multiple_choice(model, tokenizer, [{"question": question, "choices": choices,
                                                          "answer": preferred}])
    assert scores["acc"] == 1.0
    scores = evaluate_multiple_choice(model, tokenizer, [{"question": question, "choices": choices,
                                                          "answer": (preferred + 1) % 3}])
    assert scores["acc"] == 0.0


def _gloo_worker(rank, world_size, init_file, output_dir):
    import torch.distributed as dist

    from mkfast.distributed import shutdown

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, tokenizer = _tiny_mks2()
    prepare_stage2(model, rank=4, alpha=8)
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
               if parameter.requires_grad}
    Trainer(model, stage2_loss_fn(model, tokenizer, INSTRUCTIONS, 2),
            TrainerConfig(output_dir=output_dir, steps=2, learning_rate=1e-2,
                          progress=False)).train(resume=False)
    flat = torch.cat([parameter.detach().flatten() for name, parameter in model.named_parameters()
                      if parameter.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    moved = any(not torch.equal(parameter, initial[name]) for name, parameter in model.named_parameters()
                if parameter.requires_grad)
    trained = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
               if parameter.requires_grad}
    torch.save({"identical": all(torch.equal(gathered[0], other) for other in gathered), "moved": moved,
                "trained": trained}, os.path.join(output_dir, f"rank{rank}.pt"))
    # The same run with the language model sharded by FSDP2 (its checkpoint holds full tensors).
    from mkfast.distributed import llama_fsdp_units

    model, tokenizer = _tiny_mks2()
    prepare_stage2(model, rank=4, alpha=8)
    Trainer(model, stage2_loss_fn(model, tokenizer, INSTRUCTIONS, 2),
            TrainerConfig(output_dir=os.path.join(output_dir, "fsdp"), steps=2, learning_rate=1e-2,
                          progress=False),
            fsdp_units=llama_fsdp_units(model.language_model,
                                        embedding_looked_up_outside=True)).train(resume=False)
    shutdown()


@pytest.mark.slow
def test_two_process_gloo_stage2_keeps_ranks_identical_and_fsdp2_matches(tmp_path):
    """Each rank draws different batches; averaged gradients keep the LoRA/router weights equal on both."""
    multiprocessing.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["identical"] and result["moved"]
    # FSDP2 averages the sharded gradients by reduce-scatter instead of all-reduce: the same update.
    sharded = torch.load(latest_checkpoint(str(tmp_path / "fsdp")), weights_only=True)
    assert sharded["step"] == 2
    replicated = torch.load(tmp_path / "rank0.pt")["trained"]
    assert sharded["model"].keys() >= replicated.keys()
    for name, tensor in replicated.items():
        torch.testing.assert_close(sharded["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_more_ranks_per_node_than_gpus_is_refused_before_nccl_starts(monkeypatch):
    from mkfast.distributed import init_from_environment

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="2 processes per node but 1 visible GPU"):
        init_from_environment(use_cuda=True)
    assert not torch.distributed.is_initialized()


def test_stage1_trains_its_fp32_head_over_a_bf16_language_model():
    """A real Llama runs in bf16 on a GPU; the stage-1 head and its loss stay fp32."""
    tokenizer = word_level_tokenizer(demo_vocabulary())
    config = SmallLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = build_mks2(small_llama(config, tokenizer).to(torch.bfloat16), image_size=IMAGE_SIZE)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    loss_fn = stage1_loss_fn(model, tokenizer, CaptionData(images, CAPTIONS), 4)
    losses = loss_fn(torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["text_to_image"])
    head = model.text_to_image_head.weight
    assert head.grad is not None and head.dtype == torch.float32


def test_without_matplotlib_a_run_warns_and_skips_its_loss_plot(tmp_path, monkeypatch):
    import sys

    from mkfast.mks2.trainer import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        plot_losses(str(metrics), str(tmp_path / "loss.png"))
    assert not (tmp_path / "loss.png").exists()
