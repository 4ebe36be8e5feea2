"""MKS2's claim where it must hold: entities whose colour only their images show.

On the digits (mkfast.mks2.demo) stage 1 stores each class's colour, but the questions are
answered at a position where the frozen attention does not bring it, and MoMEs trains no
attention (docs/methods.md, "Why the MKS2 claim does not show at the demo's size"). This check
asks where stage 1 writes: every entity has a random name, every caption is "a thing named
<name>" (never a colour), and a stage-2 instruction is that caption closed by ``</s>``, the
token whose hidden state stage 1's InfoNCE reads, answered "red" or "blue". The colours are
drawn at random, so text alone cannot tell an unasked entity's colour, and the instruction-LoRA
baseline is at chance on them by construction.

The images are synthetic frozen features (what the BLIP-2 side would give): one colour direction
shared by every entity (the attribute an encoder makes most salient), plus a random part of the
entity's own. Everything else is the method as the digits demo runs it: the small Llama
pretrained on text that names every entity but never a colour, stage 1 (L_c + L_t2i, MVMs,
projection and head), MoMEs (LoRA r=8 on both experts + router) against INST-LoRA (LoRA r=16 on
every projection), the same stage-2 instructions in the same order for every arm, and
multiple-choice scoring by log-likelihood.

Exploratory runs before it (one seed each, CPU): with [INST] ... [/INST] around the question, a
probe read the held-out colour at the caption's </s> (0.8-0.9) but not at the question's last
token (0.45-0.55), and MKS2 stayed at the constant answer's accuracy on held-out entities.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mkfast.claims import paired_claim
from mkfast.data.colour_digits import constant_answer_accuracy
from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
from mkfast.data.nonce_names import nonce_names
from mkfast.mks2 import small_runs
from mkfast.mks2.build import build_mks2
from mkfast.mks2.stages import CaptionData, InstructionData, prepare_stage2, stage1_loss_fn
from mkfast.mks2.trainer import Trainer
from mkfast.mks2.vision import ImageFeatures

PAPER = "MKS2"
NAME_SYLLABLES = 3  # joined into one word: one token of the word-level tokenizer
COLOURS = ("red", "blue")
CAPTION = "a thing named {name}"
ARMS = ("mks2", "baseline", "no_stage1")
# The base's pretraining text: every caption once, and the colour words in use.
COLOUR_TEXT = "the colour {colour}"
COLOUR_TEXT_REPEATS = 20


@dataclass(frozen=True)
class EntitySizes:
    asked: int  # entities whose colour stage 2 teaches
    held_out: int  # entities only stage 1 saw; the questions ask their colour
    pretrain_steps: int
    stage1_steps: int
    stage2_steps: int
    colour_scale: float = 4.0  # the colour direction's norm against the entity's own unit-norm part
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = EntitySizes(asked=12, held_out=8, pretrain_steps=20, stage1_steps=20, stage2_steps=20, seeds=(0, 1))
FULL = EntitySizes(asked=80, held_out=40, pretrain_steps=300, stage1_steps=2000, stage2_steps=1000)


@dataclass
class EntityWorld:
    names: list[str]
    colours: torch.Tensor  # (N,) 0 red, 1 blue; half of each, shuffled
    asked: int

    @property
    def held_out(self) -> range:
        return range(self.asked, len(self.names))


def make_world(sizes: EntitySizes, seed: int) -> EntityWorld:
    count = sizes.asked + sizes.held_out
    generator = torch.Generator().manual_seed(seed)
    names = nonce_names(count, generator, NAME_SYLLABLES, separator="")
    colours = (torch.arange(count) % len(COLOURS))[torch.randperm(count, generator=generator)]
    return EntityWorld(names, colours, sizes.asked)


def image_features(world: EntityWorld, vision, colour_scale: float, seed: int) -> ImageFeatures:
    """Synthetic frozen features shaped like ``vision``'s: +-colour_scale along one shared colour
    direction (per query token and for the global feature) plus a unit-norm random part per entity."""
    generator = torch.Generator().manual_seed(seed + 1)
    count = len(world.names)
    queries, query_size = vision.num_query_tokens, vision.query_tokens.shape[-1]
    sign = (world.colours.float() * 2 - 1) * colour_scale
    global_size = vision.global_feature_size
    global_direction = F.normalize(torch.randn(global_size, generator=generator), dim=0)
    query_direction = F.normalize(torch.randn(queries, query_size, generator=generator), dim=-1)
    global_features = (sign[:, None] * global_direction
                       + F.normalize(torch.randn(count, global_size, generator=generator), dim=-1))
    query_output = (sign[:, None, None] * query_direction
                    + F.normalize(torch.randn(count, queries, query_size, generator=generator), dim=-1))
    return ImageFeatures(query_output, global_features)


def question(name: str) -> str:
    """The caption closed by </s>: the answer is read where stage 1's InfoNCE reads."""
    return f"{CAPTION.format(name=name)} </s>"


def question_items(world: EntityWorld, entities) -> list[dict]:
    return [{"question": question(world.names[entity]), "choices": list(COLOURS),
             "answer": int(world.colours[entity])} for entity in entities]


def tokenizer_for(world: EntityWorld):
    return word_level_tokenizer(demo_vocabulary([*COLOURS, *world.names, CAPTION.format(name="x"),
                                                 COLOUR_TEXT.format(colour="x")]))


def run(sizes: EntitySizes, seed: int, output_dir: str) -> dict:
    """One seed: every arm's accuracy on the held-out and the asked entities' colour questions."""
    started = time.perf_counter()
    world = make_world(sizes, seed)
    tokenizer = tokenizer_for(world)
    config = small_runs.model_config(tokenizer)
    captions = [CAPTION.format(name=name) for name in world.names]
    pretraining = captions + [COLOUR_TEXT.format(colour=colour) for colour in COLOURS] * COLOUR_TEXT_REPEATS
    base_copy, _ = small_runs.pretrained_base(config, tokenizer, pretraining, sizes.pretrain_steps,
                                              output_dir, seed)
    models = {arm: build_mks2(base_copy(), image_size=32, seed=seed) for arm in ("mks2", "no_stage1")}
    features = image_features(world, models["mks2"].vision, sizes.colour_scale, seed)
    pairs = CaptionData(features, captions)
    stage1 = Trainer(models["mks2"], stage1_loss_fn(models["mks2"], tokenizer, pairs, small_runs.BATCH_SIZE),
                     small_runs.trainer_config(output_dir, "mks2_stage1", sizes.stage1_steps, seed),
                     "entities stage1").train(resume=False)
    models["baseline"] = small_runs.inst_lora_baseline(base_copy(), seed)
    for arm in ("mks2", "no_stage1"):
        prepare_stage2(models[arm], rank=small_runs.LORA_RANK, alpha=small_runs.LORA_ALPHA, seed=seed)
    asked = question_items(world, range(world.asked))
    held_out = question_items(world, world.held_out)
    instructions = InstructionData([item["question"] for item in asked],
                                   [item["choices"][item["answer"]] for item in asked], [None] * len(asked))
    results = {}
    for arm in ARMS:
        small_runs.train_stage2(models[arm], tokenizer, instructions, sizes.stage2_steps, output_dir, arm,
                                seed)
        results[arm] = {
            "held_out": small_runs.evaluate_colour_questions(models[arm], tokenizer, held_out),
            "asked": small_runs.evaluate_colour_questions(models[arm], tokenizer, asked)}
    return {"seed": seed, "results": results, "stage1_final_loss": stage1[-1]["loss"],
            "constant_answer_accuracy": {colour: constant_answer_accuracy(held_out, colour)
                                         for colour in COLOURS},
            "seconds": time.perf_counter() - started}


def claims(runs: list[dict]) -> list[dict]:
    def accuracies(arm: str) -> list[float]:
        return [run["results"][arm]["held_out"]["acc"] for run in runs]

    what = "held-out entities' colour acc"
    return [paired_claim(PAPER, "mechanism: stored visual knowledge answers text-only questions on entities "
                         "stage 2 never asked (synthetic image features, answer read at </s>)",
                         f"MKS2 vs INST-LoRA r=16, {what}", accuracies("mks2"), accuracies("baseline")),
            paired_claim(PAPER, "mechanism: the gain needs stage 1", f"MKS2 vs no stage 1, {what}",
                         accuracies("mks2"), accuracies("no_stage1"))]


def summary_of(sizes: EntitySizes, runs: list[dict]) -> dict:
    def mean(arm: str, part: str) -> float:
        return sum(run["results"][arm][part]["acc"] for run in runs) / len(runs)

    return {"sizes": sizes.__dict__, "seeds": [run["seed"] for run in runs],
            "held_out_acc": {arm: mean(arm, "held_out") for arm in ARMS},
            "asked_acc": {arm: mean(arm, "asked") for arm in ARMS}, "runs": runs}


def output_dir_for(root: str, seed: int) -> str:
    return os.path.join(root, f"entities_seed{seed}")
