"""The MKS2 demo on the digits set: does visual knowledge stored from images help text-only answers?

The knowledge is one no text states (mkfast.data.colour_digits): every digit class is drawn
in red or blue, captions name the digit only, stage-2 text instructions give the colour of
eight classes, and the held-out questions ask the colour of the other two, one of each
colour, so any name prior or constant answer scores 0.5.

A small Llama (built from config, seed-fixed, pretrained on the demo's plain text, which
holds the colour words but never a digit's colour) is the frozen base of four arms trained
on the same stage-2 text instructions, in the same order:

- ``mks2``: stage 1 (MVM + projection + InfoNCE head) on the coloured image-caption pairs,
  then MoMEs (LoRA r=8 on both experts + router);
- ``shuffled_pairs``: stage 1 for as many steps on the same images and captions paired at
  random, then MoMEs (stage 1's compute without its pairing);
- ``no_stage1``: the visual memory at its zero-output initialisation, then MoMEs;
- ``baseline`` (the paper's INST-LoRA): LoRA r=16 on every projection of the plain LLM.

Before stage 2 a logistic-regression probe, fitted on the training classes with its L2
strength chosen by cross-validation over held-out classes (mkfast.mks2.probes), reads the
colour of the held-out classes from the model with MVMs on text alone (its last hidden state
at the class name's token and at the closing </s>). It must read it above chance and above
the same probe on the arm without stage 1 (paired over runs): the base alone predicts some
colourings from its similarities between digit names. Without that signal the stage-2
comparison cannot show anything, and the results say so. Two diagnostics say where the colour
went: an image-side colour classifier (fitted on image features of randomly coloured digits,
so it knows no class's colour) applied to the InfoNCE head's output, and the share of the
between-class spread that colour explains in the image features, the hidden states and the
head's output (a random half/half labelling of ten classes: 1/9).

Beside them, a mechanism check (mkfast.mks2.entity_memory) asks the colour of entities where
stage 1 writes it, at the caption's closing </s>, three seeds in the same pool of processes.

Each run pairs a training seed with a colour split (five runs: one cycle, every class held out
once); the runs give each claim's mean gain and 95% interval (mkfast.claims). On CPU the runs
go side by side, one process per core (mkfast.parallel), with results identical to running
them one after another. Step counts are sized for the CPU; on a GPU the MoMEFFN layers run
mkfast's fused Triton op.
"""

from __future__ import annotations

import json
import os
import time

import torch

from mkfast.claims import mean_interval, paired_claim
from mkfast.data.colour_digits import (
    COLOUR_NAMES,
    COLOUR_WORD_TEXTS,
    HELD_OUT_PER_COLOUR,
    PROBE_TEMPLATES,
    colour_split,
    coloured_pairs,
    constant_answer_accuracy,
    held_out_questions,
    pretraining_texts,
    randomly_coloured,
    seen_questions,
    stage2_instructions,
)
from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer
from mkfast.data.digits import DIGIT_NAMES, load_digits_pairs
from mkfast.mks2 import entity_memory
from mkfast.mks2.build import build_mks2
from mkfast.mks2.model import MKS2Model
from mkfast.mks2.patching import seeded, trainable_parameter_count
from mkfast.mks2.probes import MAX_ITERATIONS, attribute_share, class_held_out_probe, unit_rows
from mkfast.mks2.samples import caption_sample
from mkfast.mks2.small_runs import (
    BATCH_SIZE,
    LEARNING_RATE,
    LORA_ALPHA,
    LORA_RANK,
    evaluate_colour_questions,
    inst_lora_baseline,
    model_config,
    pretrained_base,
    train_stage2,
    trainer_config,
)
from mkfast.mks2.stages import CaptionData, InstructionData, prepare_stage2, stage1_loss_fn
from mkfast.mks2.trainer import Trainer
from mkfast.parallel import one_thread, run_in_processes

ARMS = ("mks2", "shuffled_pairs", "no_stage1", "baseline")
STAGE1_ARMS = ("mks2", "shuffled_pairs", "no_stage1")
# run i uses seed runs[i] and colour split i: [seed, *repeat_seeds].
# "entities": the mechanism check's sizes (mkfast.mks2.entity_memory); settings without it skip it.
QUICK = {"pretrain_steps": 60, "vision_pretrain_steps": 20, "stage1_steps": 20, "stage2_steps": 30,
         "repeat_seeds": (1,), "entities": entity_memory.QUICK}
# Five runs: each asks about only four held-out classes, so runs, not steps, narrow the intervals.
FULL = {"pretrain_steps": 400, "vision_pretrain_steps": 150, "stage1_steps": 300, "stage2_steps": 400,
        "repeat_seeds": (1, 2, 3, 4), "entities": entity_memory.FULL}
# On a GPU: twice the runs (seed x split).
GPU_FULL = {**FULL, "repeat_seeds": tuple(range(1, 10))}
VISION_BATCH_SIZE = 64
VISION_LEARNING_RATE = 1e-3
# Expected share of the between-class spread a random five/five labelling of ten classes explains.
RANDOM_HALF_SPLIT_SHARE = 1 / 9
HELD_OUT_CLASSES = HELD_OUT_PER_COLOUR * len(COLOUR_NAMES)
CLAIM = "stored visual knowledge improves text-only answers over the instruction-LoRA baseline"
CONTROLS = (("shuffled_pairs", "the gain needs stage 1's image-caption pairing"),
            ("no_stage1", "the gain needs stage 1"))


def demo_settings(quick: bool, device: torch.device | str) -> dict:
    """QUICK checks the pipeline on any device; the full run grows on a GPU."""
    if quick:
        return QUICK
    return GPU_FULL if torch.device(device).type == "cuda" else FULL


def demo_tokenizer():
    words = [*COLOUR_WORD_TEXTS, *(template.format(name=DIGIT_NAMES[0]) for template in PROBE_TEMPLATES)]
    return word_level_tokenizer(demo_vocabulary(words))


def pretrain_vision_encoder(vision, images: torch.Tensor, label_sets: list[torch.Tensor], steps: int,
                            seed: int) -> list[float]:
    """Stand-in for BLIP-2's own pretraining: the small ViT + Q-Former learn each of ``label_sets`` (here
    the digit and a colour drawn independently of it) through linear heads on the pooled feature and on
    the mean query output, then go back to frozen."""
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    device = vision.query_tokens.device
    query_tokens = nn.Parameter(vision.query_tokens.clone())
    with seeded(seed):  # the heads' initialisation depends on ``seed`` only, not on what ran before
        heads = nn.ModuleList([nn.Linear(size, int(labels.max()) + 1) for labels in label_sets
                               for size in (vision.global_feature_size, query_tokens.shape[-1])]).to(device)
    parameters = [query_tokens, *heads.parameters(), *vision.vision_model.parameters(),
                  *vision.qformer.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=VISION_LEARNING_RATE)
    losses = []
    for _ in range(steps):
        indices = torch.randint(len(images), (VISION_BATCH_SIZE,), generator=generator)
        vision_output = vision.vision_model(pixel_values=images[indices].to(device))
        query = vision.qformer(query_embeds=query_tokens.expand(len(indices), -1, -1),
                               encoder_hidden_states=vision_output.last_hidden_state).last_hidden_state
        loss = sum(torch.nn.functional.cross_entropy(heads[2 * task + part](feature),
                                                     labels[indices].to(device))
                   for task, labels in enumerate(label_sets)
                   for part, feature in enumerate((vision_output.pooler_output, query.mean(dim=1))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        vision.query_tokens.copy_(query_tokens)
    for parameter in parameters:
        parameter.requires_grad_(False)
    vision.train(vision.training)  # encoders back to eval mode
    return losses


@torch.no_grad()
def text_features(model: MKS2Model, tokenizer, texts: list[str],
                  names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2 * H): the last hidden state of the model with its MVMs at the token of names[i] and at the
    </s> closing texts[i] (stage 1's read-out token), the text alone through the model (no image);
    (N, D_vision): stage 1's InfoNCE head on the </s> state. The frozen base is the same in every
    arm: what differs between arms is what the MVMs (and the head) add."""
    rows, head_rows = [], []
    for text, name in zip(texts, names, strict=True):
        sample = caption_sample(tokenizer, text)
        name_position = sample.token_ids.index(tokenizer.convert_tokens_to_ids(name))
        inputs_embeds, attention_mask, _ = model.assemble([sample])
        hidden = model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      output_hidden_states=True).hidden_states[-1][0]
        rows.append(torch.cat([hidden[name_position], hidden[-1]]).float().cpu())
        head_rows.append(model.text_to_image_head(hidden[-1].to(model.text_to_image_head.weight.dtype)).cpu())
    return torch.stack(rows), torch.stack(head_rows).float()


def probe_held_out_colour(model: MKS2Model, tokenizer, split, colour_readout) -> dict:
    """Does the model with MVMs carry the held-out classes' colour, on text alone? (chance 0.5: two
    colours, balanced.)

    held_out_acc: a logistic probe on the hidden states, its L2 strength (probe_C) chosen by
    leave-one-class-out CV on the training classes (mkfast.mks2.probes), scored on the held-out
    classes: the precondition for stage 2, which reads the same states. head_held_out_acc: the
    InfoNCE head's output scored by ``colour_readout``, a classifier of colour fitted on image
    features of randomly coloured digits, so it knows no class (a diagnostic: stage 2 never sees
    the head). colour_share_*: how much of the between-class spread colour explains in the hidden
    states and in the head's output (a random half/half split of ten classes: 1/9 on average)."""
    import numpy as np

    digits = range(len(DIGIT_NAMES))
    texts = [template.format(name=DIGIT_NAMES[digit]) for digit in digits for template in PROBE_TEMPLATES]
    names = [DIGIT_NAMES[digit] for digit in digits for _ in PROBE_TEMPLATES]
    classes = np.array([digit for digit in digits for _ in PROBE_TEMPLATES])
    colours = np.array([split.colour_of[digit] for digit in classes])
    hidden, head = (part.numpy() for part in text_features(model, tokenizer, texts, names))
    train, held_out = ~np.isin(classes, split.held_out), np.isin(classes, split.held_out)
    probe = class_held_out_probe(hidden[train], colours[train], classes[train])
    head = unit_rows(head)
    colour_of = dict(enumerate(split.colour_of))
    return {"train_acc": float(probe.score(hidden[train], colours[train])),
            "held_out_acc": float(probe.score(hidden[held_out], colours[held_out])),
            "probe_C": float(probe.C),
            "head_held_out_acc": float(colour_readout.score(head[held_out], colours[held_out])),
            "colour_share_hidden": attribute_share(hidden, classes, colour_of),
            "colour_share_head": attribute_share(head, classes, colour_of)}


def image_colour_readout(vision, random_images: torch.Tensor, random_colours: torch.Tensor):
    """A logistic regression reading colour from the frozen encoder's unit-length global features, fitted
    on images coloured independently of their class (it cannot have learned any class's colour)."""
    from sklearn.linear_model import LogisticRegression

    features = unit_rows(vision.frozen_features(random_images).global_features.float().cpu().numpy())
    return LogisticRegression(max_iter=MAX_ITERATIONS).fit(features, random_colours.numpy())


def _run_one(settings: dict, output_dir: str, seed: int, split, tokenizer, base_config, pairs,
             device: torch.device) -> dict:
    """One (seed, colour split): base pretraining, the vision stand-in, stage 1 per arm, the probe,
    stage 2 per arm on the same instructions, evaluation."""
    started = time.perf_counter()
    base_copy, pretraining_rows = pretrained_base(base_config, tokenizer, pretraining_texts(pairs.captions),
                                                  settings["pretrain_steps"], output_dir, seed, device)
    rows = {"base_pretraining": pretraining_rows}
    models = {arm: build_mks2(base_copy(), image_size=32, seed=seed) for arm in STAGE1_ARMS}
    vision = models["mks2"].vision
    random_images, random_colours = randomly_coloured(pairs.images, seed)
    vision_losses = pretrain_vision_encoder(vision, random_images, [pairs.labels, random_colours],
                                            settings["vision_pretrain_steps"], seed)
    for arm in STAGE1_ARMS[1:]:
        models[arm].vision.load_state_dict(vision.state_dict())
    colour_readout = image_colour_readout(vision, random_images, random_colours)
    coloured = coloured_pairs(pairs, split)
    features = vision.frozen_features(coloured.images)  # the BLIP-2 side is frozen: encode once
    # How much of the image features' between-class spread is colour: what stage 1 could store.
    image_colour_share = attribute_share(unit_rows(features.global_features.float().cpu().numpy()),
                                         coloured.labels.numpy(), dict(enumerate(split.colour_of)))
    # The shuffled arm's captions go with other pairs' images, a fixed permutation per seed.
    permutation = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    stage1_data = {"mks2": CaptionData(features, coloured.captions),
                   "shuffled_pairs": CaptionData(features[permutation], coloured.captions)}
    for arm, data in stage1_data.items():
        config = trainer_config(output_dir, f"{arm}_stage1", settings["stage1_steps"], seed)
        rows[f"{arm}_stage1"] = Trainer(models[arm], stage1_loss_fn(models[arm], tokenizer, data, BATCH_SIZE),
                                        config, f"{arm} stage1").train(resume=False)
    probe = {arm: probe_held_out_colour(models[arm], tokenizer, split, colour_readout) for arm in STAGE1_ARMS}

    models["baseline"] = inst_lora_baseline(base_copy(), seed, device)
    for arm in STAGE1_ARMS:
        prepare_stage2(models[arm], rank=LORA_RANK, alpha=LORA_ALPHA, seed=seed)
    prompts, responses = stage2_instructions(split)
    instructions = InstructionData(prompts, responses, [None] * len(prompts))
    digests, results = {}, {}
    for arm in ARMS:
        rows[f"{arm}_stage2"], digests[arm] = train_stage2(models[arm], tokenizer, instructions,
                                                      settings["stage2_steps"], output_dir, arm, seed)
        results[arm] = {"held_out": evaluate_colour_questions(models[arm], tokenizer,
                                                              held_out_questions(split)),
                        "seen": evaluate_colour_questions(models[arm], tokenizer, seen_questions(split)),
                        "stage2_trainable_parameters": trainable_parameter_count(models[arm])}
    return {"seed": seed, "split": split.index, "held_out_classes": list(split.held_out),
            "colours": {DIGIT_NAMES[digit]: split.colour_name(digit) for digit in range(10)},
            "probe": probe, "image_colour_share": image_colour_share, "results": results,
            "stage2_data_digest": digests, "rows": rows,
            "final_losses": {"vision_pretraining": vision_losses[-1]}
                            | {name: stage_rows[-1]["loss"] for name, stage_rows in rows.items()},
            "seconds": time.perf_counter() - started}


def _run_index(settings: dict, output_dir: str, seed: int, split_index: int, device: str) -> dict:
    """_run_one from picklable arguments (a worker process builds the data and tokenizer itself)."""
    pairs, _ = load_digits_pairs(image_size=32, seed=0)  # the same images for every run
    tokenizer = demo_tokenizer()
    return _run_one(settings, output_dir, seed, colour_split(split_index), tokenizer,
                    model_config(tokenizer), pairs, torch.device(device))


def _run_in_worker(kind: str, arguments: tuple) -> dict:
    """One run of either design, so that both share one pool of worker processes."""
    return _run_index(*arguments) if kind == "digits" else entity_memory.run(*arguments)


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, device: torch.device | str = "cpu",
             settings: dict | None = None, workers: int | None = None) -> dict:
    """The four arms over every (seed, split) run on ``device``; writes results.json and loss.png into
    output_dir. ``settings`` replaces the quick/full step counts (tests); ``workers`` processes run the
    runs side by side on CPU (default: one per core; mkfast.parallel), with results identical to
    ``workers=1``."""
    with one_thread():  # this model's ops are tiny (mkfast.parallel.one_thread)
        return _run_demo(output_dir, quick, seed, torch.device(device), settings, workers)


def _claims(runs: list[dict]) -> list[dict]:
    def accuracies(arm):
        return [run["results"][arm]["held_out"]["acc"] for run in runs]

    arms = "MKS2 vs INST-LoRA r=16, held-out colour questions acc"
    claims = [paired_claim("MKS2", CLAIM, arms, accuracies("mks2"), accuracies("baseline"))]
    for control, claim in CONTROLS:
        claims.append(paired_claim("MKS2 (control)", claim, f"MKS2 vs {control}, held-out colour questions "
                                   "acc", accuracies("mks2"), accuracies(control)))
    return claims


def _above(summary: dict, level: float) -> bool:
    """The 95% interval lies above ``level`` (with one run, no interval: the mean does)."""
    low = summary["interval"][0]
    return low > level if low == low else summary["mean"] > level


def _no_signal_note(probe: dict, probe_gain: dict, head_probe: dict, colour_share: dict) -> str:
    """Why the stage-2 comparison cannot show the effect, with the run's own numbers."""
    def interval(summary):
        return f"{summary['mean']:.2f} [{summary['interval'][0]:.2f}, {summary['interval'][1]:.2f}]"

    return (f"the linear probe reads the held-out classes' colour from the MKS2 arm's text-only hidden "
            f"states at {interval(probe['mks2'])} and from the same base without stage 1 at "
            f"{probe['no_stage1']['mean']:.2f} (stage 1's gain {interval(probe_gain)}; chance 0.5): stage 1 "
            "added no measurable colour signal that stage 2 could carry to unseen classes, so the stage-2 "
            "comparison cannot show the paper's effect here (what a probe reads without stage 1 most likely "
            "comes from the base's own similarities between digit names, learnt from sums, which some "
            f"colourings follow). Colour explains {colour_share['image_features']['mean']:.2f} of the "
            f"between-class spread of the image features, {colour_share['hidden_mks2']['mean']:.2f} of the "
            f"MKS2 arm's hidden states' and {colour_share['hidden_no_stage1']['mean']:.2f} without stage 1 "
            f"({RANDOM_HALF_SPLIT_SHARE:.2f} for a random half/half labelling); an image-side colour "
            f"classifier reads {head_probe['mks2']['mean']:.2f} on held-out classes from the InfoNCE head's "
            "output. The most likely reason: stage 1 writes each class its own direction (which the linear "
            "head maps onto that class's image features, colour included) rather than a colour direction "
            f"shared across classes, and a probe or LoRA fitted on {len(DIGIT_NAMES) - HELD_OUT_CLASSES} "
            f"classes can only carry a shared direction to the other {HELD_OUT_CLASSES}")


def _summary_of(values: list[float]) -> dict:
    mean, low, high = mean_interval(values)
    return {"mean": mean, "interval": [low, high], "per_run": values}


def _run_demo(output_dir: str, quick: bool, seed: int, device: torch.device, settings: dict | None,
              workers: int | None) -> dict:
    from mkfast.backend import dispatchers

    settings = settings or demo_settings(quick, device)
    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    # The runs are independent: on CPU they go side by side, one process (and thread) per core.
    arguments = [(settings, os.path.join(output_dir, f"run{index}_seed{run_seed}"), run_seed, index,
                  str(device)) for index, run_seed in enumerate((seed, *settings["repeat_seeds"]))]
    entity_sizes = settings.get("entities")
    entity_arguments = [] if entity_sizes is None else [
        ("entities", (entity_sizes, entity_seed, entity_memory.output_dir_for(output_dir, entity_seed)))
        for entity_seed in entity_sizes.seeds]
    # The entity runs are the longest: first, so that the digits runs fill the gaps.
    outcomes = run_in_processes(_run_in_worker, entity_arguments + [("digits", run) for run in arguments],
                                workers=workers, device=str(device))
    entity_runs, runs = outcomes[:len(entity_arguments)], outcomes[len(entity_arguments):]
    results = {arm: {"held_out_text_questions": _summary_of([run["results"][arm]["held_out"]["acc"]
                                                              for run in runs]),
                     "held_out_p_correct": _summary_of([run["results"][arm]["held_out"]["p_correct"]
                                                       for run in runs]),
                     "seen_questions": _summary_of([run["results"][arm]["seen"]["acc"] for run in runs]),
                     "stage2_trainable_parameters": runs[0]["results"][arm]["stage2_trainable_parameters"]}
               for arm in ARMS}
    for arm in ARMS:  # the headline's key: the mean over runs
        results[arm]["held_out_text_questions"]["acc"] = results[arm]["held_out_text_questions"]["mean"]
    probe = {arm: _summary_of([run["probe"][arm]["held_out_acc"] for run in runs]) for arm in STAGE1_ARMS}
    head_probe = {arm: _summary_of([run["probe"][arm]["head_held_out_acc"] for run in runs])
                  for arm in STAGE1_ARMS}
    colour_share = {"image_features": _summary_of([run["image_colour_share"] for run in runs])}
    for part in ("hidden", "head"):
        colour_share |= {f"{part}_{arm}": _summary_of([run["probe"][arm][f"colour_share_{part}"]
                                                       for run in runs]) for arm in STAGE1_ARMS}
    # Stage 1 must add the signal: the base alone can predict some colourings from its name similarities.
    probe_gain = _summary_of([run["probe"]["mks2"]["held_out_acc"] - run["probe"]["no_stage1"]["held_out_acc"]
                              for run in runs])
    probe_reads = _above(probe["mks2"], 0.5) and _above(probe_gain, 0.0)
    held_out_items = [item for index in range(len(runs)) for item in held_out_questions(colour_split(index))]
    all_rows = [row for run in runs[:1] for stage_rows in run["rows"].values() for row in stage_rows]
    with open(os.path.join(output_dir, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in all_rows)
    _plot(all_rows, os.path.join(output_dir, "loss.png"), device)
    summary = {
        "mode": "quick" if quick else "full", "device": str(device), "seed": seed,
        "mome_ffn_backend": dispatchers()["mome_ffn"].auto_choice(device),
        "settings": settings, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
        "model": model_config(demo_tokenizer()).__dict__, "chance_accuracy": 0.5,
        "constant_answer_accuracy": {colour: constant_answer_accuracy(held_out_items, colour)
                                     for colour in COLOUR_NAMES},
        "probe": probe, "probe_gain_over_no_stage1": probe_gain,
        "probe_reads_held_out_colour": bool(probe_reads), "head_probe": head_probe,
        "colour_share": colour_share, "random_half_split_share": RANDOM_HALF_SPLIT_SHARE,
        "results": results, "claims": _claims(runs),
        "runs": [{key: value for key, value in run.items() if key != "rows"} for run in runs],
        "seconds": {"total": time.perf_counter() - started},
    }
    if entity_runs:
        summary["entities"] = entity_memory.summary_of(entity_sizes, entity_runs)
        summary["claims"] += entity_memory.claims(entity_runs)
    if not probe_reads:
        summary["note"] = _no_signal_note(probe, probe_gain, head_probe, colour_share)
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2, default=str)
    return summary


def _plot(rows: list[dict], path: str, device: torch.device) -> None:
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return

    figure, axis = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(row["stage"] for row in rows):
        points = [row for row in rows if row["stage"] == stage]
        axis.plot([row["step"] for row in points], [row["loss"] for row in points], label=stage)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(f"MKS2 digits demo, first run ({device.type})")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
