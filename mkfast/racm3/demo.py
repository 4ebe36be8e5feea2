"""RA-CM3 on the digits, end to end: does retrieval help on knowledge held only in memory?

The design (mkfast.racm3.knowledge): a VQ tokenizer (16x16 -> 4x4 codes, see IMAGE_SIZE) and a
small CLIP train on every digit, standing in for off-the-shelf components; the generators train on
image-caption documents of the seen digits 0-6 only, plus text-only documents naming every
digit; the evaluation memory holds documents of every digit. Per seed, two identical
generators train for the same steps, one with retrieval (K ~ U{0,1,2}) and one without
(CM3). Held-out documents' main loss is measured, image tokens with documents retrieved by
the caption (text-to-image), caption tokens with documents retrieved by the image, on the
memory-only digits 7-9 and on the seen ones, for: the retrieval model with K=2 from the
full memory, with K=2 from a memory cut to the seen digits (the control: the gain must
vanish), with K=0, and the CM3 model. Every comparison is paired per seed and summarised
as a claim row (mkfast.claims). The diversity filter's threshold is calibrated on the
demo's encoder (knowledge.calibrate_threshold) and retrieval precision is reported with
the calibrated filter, RA-CM3's 0.9 and no filter.

Beside them, per seed, a mechanism check (mkfast.racm3.entity_memory) trains one more
retrieval generator on named entities whose random-code images only the memory holds: nothing
there can be memorised in place of copying, so retrieval must help if the implementation is
right, and its claim rows say whether it did.

Demo-side choices (RA-CM3's method, R1-R3, K ~ U{0,1,2}, alpha = 0.1 and the CM3 objective, is
unchanged): the digits are 16x16 and tokenized to 4x4 codes (IMAGE_SIZE), so a document is ~25
tokens and the generators get ~3x the steps an 8x8 grid allows in the same time; the generators
tie their input and output embeddings. The names of digits 7-9 occur only in text-only documents,
so training never rewards copying them from a retrieved caption: with untied embeddings the
generators learned to copy the seen digits' names (caption-token NLL 0.11 with K=2 vs 0.49 with
K=0 on digits 0-6, one seed, 1000 steps) and not 7-9's (2.81 vs 2.39). Tied, a head that copies
a token's embedding also raises that token's logit, for a name never copied in training too:
7-9's caption tokens cost 1.65 with K=2 (2.81 untied, the same run), yet over the 3 seeds of a
full run (800 steps) K=2 does not beat CM3 on them consistently (per seed +0.11, -0.45, +0.84 nats).

What the generators do not learn at this size (800 steps): to use retrieved images. On the seen
digits the image-token NLL with K=2 and K=0 agree (2.786 and 2.786, seed 0), also with a 32-code
book (1.860 and 1.861): a document's image-query neighbour shares only 18% of its 4x4 codes
position by position (a random document of its class 8%), so copying gains little over what
the caption already says, and without copying images a memory-only digit cannot be drawn or
told apart in k-shot prompts. More steps do not change it: after 3000 steps (seed 0) K=2 and K=0
still agree on the seen digits (4.139 and 4.160) while both generators overfit the ~1000 training
images (held-out image-token NLL 4.14 with retrieval, 3.11 without, against 2.79 after 800).

The generators are independent runs: on a CPU each (seed, generator) trains in its own
one-thread process (mkfast.parallel), retrieval runs first, and the results are the same
as in one process.

On a GPU every model trains there (the generator in bf16 autocast through mkfast's
flash attention, retrieval through mkfast's top-k kernel over a GPU-resident memory)
and the full run uses a larger generator for more steps (:data:`GPU_FULL`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from mkfast.claims import paired_claim
from mkfast.parallel import cpu_seconds, one_thread, run_in_processes
from mkfast.racm3 import entity_memory
from mkfast.racm3.components import COMPONENTS_FILE, DEMO_TEXT_VOCABULARY, cpu_state
from mkfast.racm3.encoder import (
    CLIPTrainingConfig,
    MixedModalEncoder,
    SmallCLIPConfig,
    build_small_clip,
    train_clip,
)
from mkfast.racm3.generator import GeneratorConfig, attention_implementation, build_generator
from mkfast.racm3.image_tokenizer import VQGAN, VQGANConfig, VQTrainingConfig, train_image_tokenizer
from mkfast.racm3.knowledge import (
    MEMORY_ONLY_CLASSES,
    SEEN_CLASSES,
    TEXT_ONLY_REPEATS,
    TrainingCorpus,
    calibrate_threshold,
    retrieval_precision,
    text_only_documents,
)
from mkfast.racm3.retrieval import (
    MAX_RETRIEVED,
    RETRIEVAL_THRESHOLD,
    RetrievalCorpus,
    SequenceOptions,
    evaluate_main_loss,
)
from mkfast.racm3.trainer import Trainer, TrainingConfig, plot_losses
from mkfast.racm3.vocabulary import CM3Vocabulary

PAPER = "RA-CM3"
GENERATORS = ("retrieval", "no_retrieval")
ENTITY_RUN = "entities"  # entity_memory's check: one more retrieval generator per seed
ENTITY_LOSS_PLOT = "entity_losses.png"
# The 8x8 digits upscaled to 16x16, tokenized to a 4x4 grid of codes: a document is ~25 tokens,
# so a 3-document sequence is ~3x cheaper than with an 8x8 grid and the generators get ~3x the
# steps in the same time. 128 codes: each covers a 4x4 patch (a 2x2 patch of the native digit).
IMAGE_SIZE = 16
DEMO_VQ = VQGANConfig(resolution=IMAGE_SIZE, base_channels=32, channel_multipliers=(1, 1, 2),
                      num_res_blocks=1, attention_resolutions=(), z_channels=32, embedding_dim=32,
                      codebook_size=128)
# 4x4-pixel patches: the same 16 patches per image as the 32x32 CLIP with 8x8 patches.
DEMO_CLIP = SmallCLIPConfig(image_size=IMAGE_SIZE, patch_size=4)


@dataclass
class DemoSizes:
    vq_steps: int
    vq_batch_size: int
    clip_steps: int
    generator_steps: int
    batch_size: int
    held_out_documents: int | None  # per class group (memory-only, seen); None: all
    seeds: tuple[int, ...] = (0, 1, 2)  # generator seeds; the components train once
    learning_rate: float = 3e-3  # small model, few steps: well above RA-CM3's 1e-4
    warmup_steps: int = 20
    # Documents here are ~25 tokens; 3 of them fit in 128 (RA-CM3: 3 in 4096).
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(max_sequence_length=128,
                                                                               tie_word_embeddings=True))
    entities: entity_memory.EntitySizes = entity_memory.FULL  # the mechanism check's runs, one per seed


# Quick: checks the pipeline (two seeds, so intervals are computed), not the claims.
QUICK = DemoSizes(vq_steps=40, vq_batch_size=16, clip_steps=30, generator_steps=20, batch_size=16,
                  held_out_documents=24, seeds=(0, 1), entities=entity_memory.QUICK)
# Full on the CPU: 3 seeds x 2 generators, two at a time on 2 cores; a no-retrieval step costs about
# a third of a retrieval one (one document per sequence instead of up to three).
FULL = DemoSizes(vq_steps=200, vq_batch_size=32, clip_steps=150, generator_steps=800, batch_size=16,
                 held_out_documents=None)
# Full on a GPU: a ~5M-parameter generator (hidden 256, 6 layers), 4x the batch, more steps.
# Sized from the CPU timings, not measured on a GPU (none was available when it was written).
GPU_FULL = DemoSizes(vq_steps=1000, vq_batch_size=64, clip_steps=600, generator_steps=2000, batch_size=64,
                     held_out_documents=None, learning_rate=1e-3, warmup_steps=100,
                     generator=GeneratorConfig(hidden_size=256, num_layers=6, num_heads=8,
                                               num_key_value_heads=8, intermediate_size=688,
                                               max_sequence_length=128, tie_word_embeddings=True))


def demo_sizes(quick: bool, device: torch.device | str) -> DemoSizes:
    """QUICK checks the pipeline on any device; the full run grows on a GPU."""
    if quick:
        return QUICK
    return GPU_FULL if torch.device(device).type == "cuda" else FULL


def build_corpora(vocabulary: CM3Vocabulary, encoder: MixedModalEncoder, train, codes: torch.Tensor,
                  device: torch.device | str = "cpu") -> tuple[RetrievalCorpus, TrainingCorpus]:
    """(memory, training): every class's training documents; the seen classes' plus text-only documents.

    The training corpus's own memory (the seen classes) is the control's memory cut to the training
    classes. ``train`` and ``codes`` are the whole training split and its VQ codes.
    """
    seen = torch.isin(train.labels, torch.tensor(SEEN_CLASSES)).nonzero().flatten()
    memory = RetrievalCorpus(vocabulary, encoder, train.captions, train.images, codes, memory_device=device)
    training = TrainingCorpus(vocabulary, encoder, [train.captions[int(row)] for row in seen],
                              train.images[seen], codes[seen], text_only_documents(), memory_device=device)
    return memory, training


def class_groups(split, limit: int | None) -> dict[str, object]:
    """{"memory_only": ..., "seen": ...}: a split's pairs of each class group, the first ``limit`` of each."""
    from mkfast.data.digits import ImageCaptionSplit, select_classes

    groups = {}
    for name, classes in (("memory_only", MEMORY_ONLY_CLASSES), ("seen", SEEN_CLASSES)):
        part = select_classes(split, classes)
        rows = slice(0, limit)
        groups[name] = ImageCaptionSplit(part.images[rows], part.labels[rows], part.captions[rows])
    return groups


def _evaluate_generator(model, name: str, corpora: dict[str, RetrievalCorpus], groups: dict, codes: dict,
                        options: SequenceOptions) -> dict:
    """{group: {configuration: {"image": nll, "text": nll}}} for one trained generator."""
    configurations = {"k2": ("memory", MAX_RETRIEVED), "k2_seen_memory": ("training", MAX_RETRIEVED),
                      "k0": ("memory", 0)} if name == "retrieval" else {"k0": ("memory", 0)}
    result = {}
    for group, split in groups.items():
        result[group] = {}
        for configuration, (corpus_name, count) in configurations.items():
            corpus = corpora[corpus_name]
            # Image tokens retrieved by the caption (text-to-image), caption tokens by the image.
            documents = (model, corpus, split.captions, split.images, codes[group])
            by_text = evaluate_main_loss(*documents, "text", count, options)
            by_image = evaluate_main_loss(*documents, "image", count, options)
            result[group][configuration] = {"image": by_text["image"], "text": by_image["text"]}
    return result


def loss_claims(per_seed: list[dict]) -> list[dict]:
    """The image-token and caption-token loss rows: RA-CM3 (K=2) against CM3, paired per seed."""
    def values(name: str, group: str, configuration: str, part: str) -> list[float]:
        return [seed[name][group][configuration][part] for seed in per_seed]

    rows = []
    for part, what in (("image", "image-token NLL"), ("text", "caption-token NLL")):
        cm3 = values("no_retrieval", "memory_only", "k0", part)
        rows.append(paired_claim(PAPER, f"retrieval lowers {what} on knowledge held only in memory",
                                 "RA-CM3 K=2 vs CM3, digits 7-9",
                                 values("retrieval", "memory_only", "k2", part), cm3, higher_is_better=False,
                                 unit=" nats"))
        rows.append(paired_claim(PAPER, f"control: memory cut to digits 0-6, {what} (no gain expected)",
                                 "RA-CM3 K=2 vs CM3, digits 7-9",
                                 values("retrieval", "memory_only", "k2_seen_memory", part), cm3,
                                 higher_is_better=False, unit=" nats", expect_no_difference=True))
    rows.append(paired_claim(PAPER, "control: seen digits, image-token NLL (agree within noise expected)",
                             "RA-CM3 K=2 vs CM3, digits 0-6", values("retrieval", "seen", "k2", "image"),
                             values("no_retrieval", "seen", "k0", "image"), higher_is_better=False,
                             unit=" nats", expect_no_difference=True))
    return rows


def train_and_evaluate(shared: bytes, generator_seed: int, name: str) -> tuple[dict, float]:
    """Train one generator (``name``: "retrieval" or "no_retrieval") and evaluate it; (evaluation, seconds).

    Module-level and fed only picklable data, so :func:`mkfast.parallel.run_in_processes` can run
    each (seed, generator) in its own process: the result does not depend on where it runs.
    shared: the run-wide inputs, pickled once by the caller rather than once per run.
    """
    started = time.perf_counter()
    shared = pickle.loads(shared)
    sizes, options, device = shared["sizes"], shared["options"], shared["device"]
    if name == ENTITY_RUN:
        training = {"batch_size": sizes.batch_size, "learning_rate": sizes.learning_rate,
                    "warmup_steps": sizes.warmup_steps}
        run_dir = entity_memory.output_dir_for(shared["output_dir"], generator_seed)
        return entity_memory.train_and_evaluate(shared["entity_world"], shared["entity_corpora"],
                                                sizes.entities, sizes.generator, training, generator_seed,
                                                run_dir, shared["progress"])
    vocabulary, corpora = shared["vocabulary"], shared["corpora"]
    torch.manual_seed(generator_seed)  # identical initial weights for both generators of a seed
    model = build_generator(len(vocabulary), sizes.generator, pad_token_id=vocabulary.pad_id, device=device)
    config = TrainingConfig(steps=sizes.generator_steps, batch_size=sizes.batch_size,
                            learning_rate=sizes.learning_rate, warmup_steps=sizes.warmup_steps,
                            checkpoint_every=max(sizes.generator_steps, 1), seed=generator_seed,
                            output_dir=os.path.join(shared["output_dir"], f"seed_{generator_seed}", name),
                            progress=shared["progress"])
    max_retrieved = MAX_RETRIEVED if name == "retrieval" else 0
    trainer = Trainer(model, corpora["training"], config, replace(options, max_retrieved=max_retrieved))
    trainer.train(resume=False)
    evaluation = _evaluate_generator(model, name, corpora, shared["groups"], shared["group_codes"], options)
    return evaluation, time.perf_counter() - started


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, progress: bool = False,
             device: torch.device | str = "cpu", sizes: DemoSizes | None = None,
             workers: int | None = None) -> dict:
    """Components once, then per generator seed a retrieval and a no-retrieval generator; writes
    results.json, components.pt, seed_<s>/{retrieval,no_retrieval}/ and loss_comparison.png.

    seed: the data split's and the components' seed; the generators' seeds are ``sizes.seeds``.
    sizes: overrides :func:`demo_sizes`. workers: processes for the generators (on a CPU one per
    core by default; each runs one thread, and so does this process, so results do not depend on
    the number of workers).
    """
    with one_thread():  # tiny models: a second thread only spins (mkfast.parallel.one_thread)
        return _run_demo(output_dir, quick, seed, progress, torch.device(device),
                         sizes or demo_sizes(quick, device), workers)


def _run_demo(output_dir: str, quick: bool, seed: int, progress: bool, device: torch.device,
              sizes: DemoSizes, workers: int | None) -> dict:
    from mkfast.data.digits import load_digits_pairs

    os.makedirs(output_dir, exist_ok=True)
    timings, started, cpu_started = {}, time.perf_counter(), cpu_seconds()
    torch.manual_seed(seed)
    train, held_out = load_digits_pairs(image_size=IMAGE_SIZE, seed=seed)

    tokenizer = VQGAN(DEMO_VQ).to(device)
    vq_training = VQTrainingConfig(steps=sizes.vq_steps, batch_size=sizes.vq_batch_size, seed=seed)
    vq_losses = train_image_tokenizer(tokenizer, train.images, vq_training, progress=progress)
    train_codes = tokenizer.encode(train.images)
    timings["vq_tokenizer_s"] = time.perf_counter() - started

    encoder = MixedModalEncoder(build_small_clip(DEMO_CLIP)).to(device)
    clip_losses = train_clip(encoder, train.images, train.captions,
                             CLIPTrainingConfig(steps=sizes.clip_steps, seed=seed), progress=progress)
    timings["clip_s"] = time.perf_counter() - started - timings["vq_tokenizer_s"]

    # The tokenizer stands in for an off-the-shelf one: it knows every caption and text-only document.
    vocabulary = CM3Vocabulary.from_corpus(train.captions + text_only_documents(1), DEMO_VQ.codebook_size,
                                           DEMO_TEXT_VOCABULARY)
    # The same components file `mkfast train racm3` writes, so inference loads a demo run like a command run.
    components = {"vq": cpu_state(tokenizer), "clip": cpu_state(encoder.clip),
                  "vocabulary": vocabulary.to_json()}
    torch.save(components, os.path.join(output_dir, COMPONENTS_FILE))
    memory, training = build_corpora(vocabulary, encoder, train, train_codes, device)
    corpora = {"memory": memory, "training": training}
    threshold = calibrate_threshold(memory.memory_embeddings, train.labels)
    groups = class_groups(held_out, sizes.held_out_documents)
    group_codes = {name: tokenizer.encode(split.images) for name, split in groups.items()}
    thresholds = {"calibrated": threshold, "rule_0.9": RETRIEVAL_THRESHOLD, "no_filter": math.inf}
    queries = (held_out.captions, held_out.images, held_out.labels)
    precision = {f"{part}_queries": {label: retrieval_precision(memory, train.labels, *queries, part,
                                                                MAX_RETRIEVED, value)
                                     for label, value in thresholds.items()}
                 for part in ("text", "image")}
    options = SequenceOptions(max_sequence_length=sizes.generator.max_sequence_length, threshold=threshold)
    timings["memory_s"] = time.perf_counter() - started - timings["vq_tokenizer_s"] - timings["clip_s"]

    entity_world = entity_memory.make_world(sizes.entities, seed)
    entity_corpora = entity_memory.build_corpora(entity_world, sizes.entities.codebook)
    shared = pickle.dumps({"sizes": sizes, "options": options, "device": device, "vocabulary": vocabulary,
              "corpora": corpora, "groups": groups, "group_codes": group_codes, "output_dir": output_dir,
              "progress": progress, "entity_world": entity_world, "entity_corpora": entity_corpora})
    # Longest first: a digits retrieval run costs ~3x a no-retrieval run, so the short ones fill the
    # gaps last.
    runs = [(generator_seed, name) for name in ("retrieval", ENTITY_RUN, "no_retrieval")
            for generator_seed in sizes.seeds]
    if progress:
        from mkfast.progress import say

        say(f"training {len(runs)} generators: {sizes.generator_steps} steps each on the digits, "
            f"{sizes.entities.steps} on the entities")
    outcomes = run_in_processes(train_and_evaluate, [(shared, *run) for run in runs], workers=workers,
                                device=str(device))
    evaluations = dict(zip(runs, outcomes, strict=True))
    per_seed = [{name: evaluations[(generator_seed, name)][0] for name in GENERATORS}
                for generator_seed in sizes.seeds]
    entity_per_seed = [evaluations[(generator_seed, ENTITY_RUN)][0] for generator_seed in sizes.seeds]
    seconds = {f"seed_{generator_seed}_{name}_s": evaluations[(generator_seed, name)][1]
               for generator_seed, name in runs}
    first = f"seed_{sizes.seeds[0]}"
    plot_losses({name: os.path.join(output_dir, first, name, "metrics.jsonl") for name in GENERATORS},
                os.path.join(output_dir, "loss_comparison.png"))
    entity_runs = {f"seed {run_seed}": entity_memory.output_dir_for(output_dir, run_seed)
                   for run_seed in sizes.seeds}
    plot_losses({label: os.path.join(path, "metrics.jsonl") for label, path in entity_runs.items()},
                os.path.join(output_dir, ENTITY_LOSS_PLOT))

    def mean(name: str, configuration: str, part: str) -> float:
        return sum(seed[name]["memory_only"][configuration][part] for seed in per_seed) / len(per_seed)

    summary = {
        "quick": quick,
        "device": str(device),
        "attention_implementation": attention_implementation(sizes.generator.attention_implementation,
                                                             device),
        "generator": asdict(sizes.generator),
        "data_seed": seed,
        "seeds": list(sizes.seeds),
        "seen_classes": list(SEEN_CLASSES),
        "memory_only_classes": list(MEMORY_ONLY_CLASSES),
        "memory_documents": len(memory),
        "training_image_documents": len(training.texts),
        "training_text_only_documents": len(training.text_only_documents),
        "text_only_repeats": TEXT_ONLY_REPEATS,
        "held_out_documents": {name: len(split) for name, split in groups.items()},
        "threshold": threshold,
        "retrieval_precision_at_2": precision,
        "generator_steps": sizes.generator_steps,
        "batch_size": sizes.batch_size,
        "vocabulary_size": len(vocabulary),
        "vq_final_loss": vq_losses[-1] if vq_losses else None,
        "clip_final_loss": clip_losses[-1] if clip_losses else None,
        # Means over seeds on the memory-only digits (the headline rows); every value is in per_seed.
        "runs": {"retrieval": {"held_out_image_token_loss": mean("retrieval", "k2", "image"),
                               "held_out_caption_token_loss": mean("retrieval", "k2", "text")},
                 "no_retrieval": {"held_out_image_token_loss": mean("no_retrieval", "k0", "image"),
                                  "held_out_caption_token_loss": mean("no_retrieval", "k0", "text")}},
        "per_seed": per_seed,
        "entities": entity_memory.summary_of(entity_world, entity_corpora, sizes.entities, entity_per_seed),
        "claims": (loss_claims(per_seed)
                   + entity_memory.entity_claims(entity_per_seed, sizes.entities.codebook)),
        "timings_s": {**timings, **seconds, "total_s": time.perf_counter() - started,
                      "cpu_s": cpu_seconds() - cpu_started},
    }
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
