"""RA-CM3 inference on the digits demo: text-to-image, captioning, k-shot, on knowledge held only in memory.

Reads what :func:`mkfast.racm3.demo.run_demo` wrote (``racm3_output_dir``: results.json,
components.pt, seed_<s>/{retrieval,no_retrieval}/ checkpoints) and, per generator seed,
evaluates on the memory-only digits 7-9 (and the seen digits 0-6 as a check):

  - configurations: the retrieval-trained model with K=2 from the full memory, with K=2
    from the memory cut to the seen digits (the control), with K=0, and the model trained
    without retrieval (CM3) with K=0;
  - text-to-image: per prompt (a digit's caption) N images sampled and reranked by CLIP
    as RA-CM3 does; the kept image, and all N, judged by an independent classifier
    (mkfast.data.judge, fitted on real pixels apart from every model here), and the kernel
    distance (KID's statistic) of the kept images to real ones. The reranking CLIP scores
    nothing reported;
  - captioning: per image M captions sampled, the lowest-perplexity one kept (RA-CM3), its
    class read from the digit it names;
  - k-shot: binary tasks between two memory-only digits with the labels "a handwritten digit
    X" / "Y" (text the generators were trained on), the ensemble of k one-shot prompts
    (RA-CM3's), k = 1, 2, 4, 8.

Each claim is a paired comparison over the seeds (mkfast.claims), in ``summary["claims"]``.
On a CPU each (seed, task) runs in its own one-thread process (mkfast.parallel).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass

import torch

from mkfast.claims import paired_claim
from mkfast.data.digits import caption_digit, digit_caption
from mkfast.data.judge import DigitJudge, kernel_distance
from mkfast.parallel import cpu_seconds, one_thread, run_in_processes
from mkfast.progress import progress_bar
from mkfast.racm3.inference import NONSENSE_LABELS, RACM3Inference
from mkfast.racm3.inference_commands import save_grid
from mkfast.racm3.knowledge import MEMORY_ONLY_CLASSES
from mkfast.racm3.metrics import continuation_log_probabilities

COMPONENTS_FILE = "components.pt"
SHOTS = (1, 2, 4, 8)
# Documents are ~25 tokens; the demo generator was trained on 128-token sequences (3 documents).
TRAINED_SEQUENCE_LENGTH = 128
# Digit captions are 4-6 BPE tokens; 16 lets a wrong caption run on without wasting steps.
DEMO_MAX_CAPTION_TOKENS = 16
PAPER = "RA-CM3"
# configuration -> (generator, memory, K)
CONFIGURATIONS = {"racm3_k2": ("retrieval", "memory", 2),
                  "racm3_k2_seen_memory": ("retrieval", "training", 2),
                  "racm3_k0": ("retrieval", "memory", 0),
                  "cm3_k0": ("no_retrieval", "memory", 0)}
# The seen digits are a check that retrieval does not hurt what the generator knows: two configurations.
SEEN_CONFIGURATIONS = ("racm3_k2", "cm3_k0")


@dataclass
class InferenceSizes:
    prompts_per_class: int  # text-to-image prompts per digit (one caption, different sampling seeds)
    image_samples: int  # images sampled per prompt (RA-CM3: 10)
    images_per_class: int  # captioning queries per digit (held-out images)
    caption_samples: int  # captions sampled per image (RA-CM3: 32)
    classification_queries: int  # k-shot queries per seed
    shots: tuple[int, ...] = SHOTS
    seen_per_class: int = 1  # prompts and images per seen digit


QUICK = InferenceSizes(prompts_per_class=1, image_samples=2, images_per_class=1, caption_samples=2,
                       classification_queries=6)
# Full: per seed 62 text-to-image prompts, 86 captioned images and 200 k-shot queries.
FULL = InferenceSizes(prompts_per_class=4, image_samples=4, images_per_class=6, caption_samples=4,
                      classification_queries=200)


# ----------------------------------------------------------------------------- loading
def _latest_checkpoint(directory: str) -> str:
    paths = sorted(glob.glob(os.path.join(directory, "checkpoint_*.pt")))
    if not paths:
        raise FileNotFoundError(f"no checkpoint_*.pt in {directory}")
    return paths[-1]


def load_generators(racm3_output_dir: str, seed: int, vocabulary_size: int, generator_config: dict,
                    pad_token_id: int, device: torch.device | str = "cpu") -> dict:
    """{"retrieval": model, "no_retrieval": model} of one generator seed, in eval mode on ``device``."""
    from mkfast.racm3.generator import GeneratorConfig, build_generator

    generators = {}
    for name in ("retrieval", "no_retrieval"):
        state = torch.load(_latest_checkpoint(os.path.join(racm3_output_dir, f"seed_{seed}", name)),
                           map_location="cpu", weights_only=False)
        model = build_generator(vocabulary_size, GeneratorConfig(**generator_config),
                                pad_token_id=pad_token_id, device=device)
        model.load_state_dict(state["model"])
        generators[name] = model.eval()
    return generators


def load_demo_run(racm3_output_dir: str, cache_dir: str | None = None,
                  device: torch.device | str = "cpu", generator_seed: int | None = None) -> dict:
    """The demo's components, splits and corpora, and one seed's generators, on ``device``.

    cache_dir: unused, kept for callers of the older layout. generator_seed: whose generators
    (default: the first seed's). Returns summary, generators, tokenizer, encoder, vocabulary,
    train (every class: the memory's pairs), held_out, memory and training corpora, seed.
    """
    from mkfast.data.digits import load_digits_pairs
    from mkfast.racm3.components import load_components
    from mkfast.racm3.demo import DEMO_CLIP, DEMO_VQ, IMAGE_SIZE, build_corpora
    from mkfast.racm3.encoder import MixedModalEncoder, build_small_clip
    from mkfast.racm3.image_tokenizer import VQGAN
    from mkfast.racm3.vocabulary import CM3Vocabulary

    with open(os.path.join(racm3_output_dir, "results.json")) as handle:
        summary = json.load(handle)
    if "seeds" not in summary:
        raise ValueError(f"load_demo_run: {racm3_output_dir} was written by an older demo (no per-seed "
                         "generators); rerun `mkfast demo --stages racm3`")
    components = load_components(os.path.join(racm3_output_dir, COMPONENTS_FILE))
    tokenizer = VQGAN(DEMO_VQ)
    tokenizer.load_state_dict(components["vq"])
    encoder = MixedModalEncoder(build_small_clip(DEMO_CLIP))
    encoder.clip.load_state_dict(components["clip"])
    tokenizer, encoder = tokenizer.to(device).eval(), encoder.to(device).eval()
    vocabulary = CM3Vocabulary.from_json(components["vocabulary"])
    if len(vocabulary) != summary["vocabulary_size"]:
        raise ValueError(f"load_demo_run: the saved vocabulary has {len(vocabulary)} ids, the demo's had "
                         f"{summary['vocabulary_size']}")
    train, held_out = load_digits_pairs(image_size=IMAGE_SIZE, seed=summary["data_seed"])
    memory, training = build_corpora(vocabulary, encoder, train, tokenizer.encode(train.images), device)
    seed = summary["seeds"][0] if generator_seed is None else generator_seed
    generators = load_generators(racm3_output_dir, seed, len(vocabulary), summary["generator"],
                                 vocabulary.pad_id, device)
    return {"summary": summary, "generators": generators, "tokenizer": tokenizer, "encoder": encoder,
            "vocabulary": vocabulary, "train": train, "held_out": held_out, "memory": memory,
            "training": training, "seed": seed, "replayed_components": False}


# ----------------------------------------------------------------------------- tasks
def evaluate_text_to_image(pipeline: RACM3Inference, classes: list[int], k: int, sizes: InferenceSizes,
                           judge: DigitJudge, seed: int, desc: str) -> tuple[dict, list]:
    """Per prompt the CLIP-reranked best of N; the judge's accuracy on the kept images and on all N."""
    prompts = [label for label in classes for _ in range(sizes.prompts_per_class)]
    results = [pipeline.text_to_image(digit_caption(label), k=k, num_samples=sizes.image_samples,
                                      seed=seed + index)
               for index, label in progress_bar(list(enumerate(prompts)), desc=desc)]
    best = torch.stack([result.images[0] for result in results])
    every = torch.cat([result.images for result in results])
    return {"judge_accuracy_best": judge.accuracy(best, prompts),
            "judge_accuracy_all_samples": judge.accuracy(every, [label for label in prompts
                                                                 for _ in range(sizes.image_samples)]),
            "prompts": len(prompts)}, results


def evaluate_image_to_text(pipeline: RACM3Inference, images: torch.Tensor, labels: torch.Tensor, k: int,
                           sizes: InferenceSizes, seed: int, desc: str) -> dict:
    """The lowest-perplexity of M sampled captions per image; class accuracy from the digit it names."""
    captions = [pipeline.image_to_text(image, k=k, num_captions=sizes.caption_samples, seed=seed + index,
                                       max_caption_tokens=DEMO_MAX_CAPTION_TOKENS).caption
                for index, image in progress_bar(list(enumerate(images)), desc=desc)]
    named = [caption_digit(caption) for caption in captions]
    correct = [int(digit == int(label)) for digit, label in zip(named, labels, strict=True)]
    return {"class_accuracy": sum(correct) / max(1, len(correct)), "images": len(correct),
            "examples": [[digit_caption(int(label)), caption]
                         for label, caption in zip(labels[:4], captions[:4], strict=True)]}


def _one_shot_probabilities(pipeline: RACM3Inference, query_codes: torch.Tensor, pairs: list) -> torch.Tensor:
    """(P, 2) p(label) per one-shot prompt, every prompt's two continuations in one batched pass."""
    prefixes = [torch.tensor(pipeline.context_ids(list(pair)) + pipeline._infill_caption_prefix(query_codes))
                for pair in pairs]
    if len({len(prefix) for prefix in prefixes}) != 1:  # labels of unequal token counts: one prompt at a time
        return torch.stack([pipeline.label_probabilities(query_codes, list(pair)) for pair in pairs])
    continuations = [pipeline.vocabulary.encode_text(label) + [pipeline.vocabulary.separator_id]
                     for label in NONSENSE_LABELS]
    prefix_batch = torch.stack([prefix for prefix in prefixes for _ in continuations])
    values = continuation_log_probabilities(pipeline.model, prefix_batch, continuations * len(pairs))
    log_likelihoods = torch.stack([value.double().sum() for value in values])
    log_likelihoods = log_likelihoods.view(len(pairs), len(continuations))
    return torch.softmax(log_likelihoods, dim=1)


def evaluate_k_shot(pipeline: RACM3Inference, memory_labels: torch.Tensor, query_images: torch.Tensor,
                    query_labels: torch.Tensor, query_count: int, seed: int, shots: tuple[int, ...] = SHOTS,
                    classes: tuple[int, ...] = MEMORY_ONLY_CLASSES) -> dict:
    """Binary tasks between two memory-only digits, labels X / Y assigned at random per query.

    Query i is held-out image i mod n (a fresh pair of digits and demonstrations each time);
    demonstrations are memory documents' images. The ensemble of k averages the first k of
    the same max(shots) one-shot prompts, so larger k adds prompts to smaller k's.
    """
    generator = torch.Generator().manual_seed(seed)
    tokenizer_device = next(pipeline.image_tokenizer.parameters()).device
    query_codes = pipeline.image_tokenizer.encode(query_images.to(tokenizer_device))
    by_label = {label: (memory_labels == label).nonzero().flatten() for label in classes}
    correct = {k: [] for k in shots}
    for query in progress_bar(range(query_count), desc="k-shot queries"):
        row = query % len(query_labels)
        true_label = int(query_labels[row])
        others = [label for label in classes if label != true_label]
        other = others[int(torch.randint(0, len(others), (1,), generator=generator))]
        swap = bool(torch.rand((), generator=generator) < 0.5)
        pair_classes = [true_label, other] if swap else [other, true_label]
        target = pair_classes.index(true_label)  # 0 -> label X, 1 -> label Y
        draws = [by_label[label][torch.randperm(len(by_label[label]), generator=generator)[:max(shots)]]
                 for label in pair_classes]
        pairs = [tuple(pipeline.demonstration(pipeline.corpus.codes[int(draws[slot][shot])],
                                              NONSENSE_LABELS[slot]) for slot in range(2))
                 for shot in range(max(shots))]
        probabilities = _one_shot_probabilities(pipeline, query_codes[row].cpu(), pairs)
        for k in shots:
            correct[k].append(int(int(probabilities[:k].mean(dim=0).argmax()) == target))
    return {"ensemble_accuracy": {k: sum(values) / len(values) for k, values in correct.items()},
            "queries": query_count}


def _per_class(split, classes, count: int):
    rows = torch.cat([(split.labels == label).nonzero().flatten()[:count] for label in classes])
    return split.images[rows], split.labels[rows]


TASKS = ("generation", "k_shot")


def evaluate_seed(run: dict, generators: dict, seed: int, sizes: InferenceSizes, judge: DigitJudge,
                  output_dir: str | None, tasks: tuple[str, ...] = TASKS) -> dict:
    """For one seed, the ``tasks``: "generation" (every configuration's text-to-image and captioning on
    both class groups) and "k_shot"."""
    summary = run["summary"]
    groups = {"memory_only": tuple(summary["memory_only_classes"]), "seen": tuple(summary["seen_classes"])}
    held_out = run["held_out"]
    result: dict = {}
    for name, (generator_name, memory_name, k) in CONFIGURATIONS.items():
        if "generation" not in tasks:
            break
        pipeline = RACM3Inference(generators[generator_name], run[memory_name], run["tokenizer"],
                                  threshold=summary["threshold"])
        result[name] = {}
        for group, classes in groups.items():
            if group == "seen" and name not in SEEN_CONFIGURATIONS:
                continue
            count = sizes.prompts_per_class if group == "memory_only" else sizes.seen_per_class
            text_to_image, results = evaluate_text_to_image(
                pipeline, list(classes), k, InferenceSizes(**{**sizes.__dict__, "prompts_per_class": count}),
                judge, seed, f"seed {seed} {name} text to image, {group}")
            if group == "memory_only":
                real = held_out.images[torch.isin(held_out.labels, torch.tensor(classes))]
                best = torch.stack([result.images[0] for result in results])
                text_to_image["kernel_distance"] = kernel_distance(real, best)
                if output_dir and name == "racm3_k2":
                    grid = os.path.join(output_dir, "text_to_image_grid.png")
                    save_grid(results[::max(1, count)], pipeline.corpus, grid, k)
            images, labels = _per_class(held_out, classes, sizes.images_per_class if group == "memory_only"
                                        else sizes.seen_per_class)
            captions = evaluate_image_to_text(pipeline, images, labels, k, sizes, seed,
                                              f"seed {seed} {name} captions, {group}")
            result[name][group] = {"text_to_image": text_to_image, "image_to_text": captions}
    if "k_shot" not in tasks:
        return result
    pipeline = RACM3Inference(generators["retrieval"], run["memory"], run["tokenizer"],
                              threshold=summary["threshold"])
    query_images, query_labels = _per_class(held_out, groups["memory_only"], len(held_out.labels))
    result["k_shot"] = evaluate_k_shot(pipeline, run["train"].labels, query_images, query_labels,
                                       sizes.classification_queries, seed, sizes.shots, groups["memory_only"])
    return result


def evaluate_seed_task(racm3_output_dir: str, seed: int, task: str, sizes: InferenceSizes, judge: DigitJudge,
                       output_dir: str | None, device: str) -> dict:
    """:func:`evaluate_seed` for one seed and one task, loading what it needs from the racm3 stage's
    files: module-level and fed picklable arguments, so :func:`mkfast.parallel.run_in_processes`
    runs each in its own process."""
    run = load_demo_run(racm3_output_dir, device=device, generator_seed=seed)
    return evaluate_seed(run, run["generators"], seed, sizes, judge, output_dir, tasks=(task,))


def inference_claims(per_seed: list[dict], shots: tuple[int, ...]) -> list[dict]:
    """The image-generation, captioning and k-shot rows, paired per seed."""
    def values(name: str, group: str, task: str, metric: str) -> list[float]:
        return [seed[name][group][task][metric] for seed in per_seed]

    rows = []
    for task, metric, what in (("text_to_image", "judge_accuracy_best", "image generation"),
                               ("image_to_text", "class_accuracy", "captioning")):
        cm3 = values("cm3_k0", "memory_only", task, metric)
        rows.append(paired_claim(PAPER, f"retrieval improves {what} on knowledge held only in memory",
                                 "RA-CM3 K=2 vs CM3, digits 7-9, judged class accuracy",
                                 values("racm3_k2", "memory_only", task, metric), cm3))
        rows.append(paired_claim(PAPER, f"control: memory cut to digits 0-6, {what} (no gain expected)",
                                 "RA-CM3 K=2 vs CM3, digits 7-9, judged class accuracy",
                                 values("racm3_k2_seen_memory", "memory_only", task, metric), cm3,
                                 expect_no_difference=True))
        rows.append(paired_claim(PAPER, f"control: seen digits, {what} (agree within noise expected)",
                                 "RA-CM3 K=2 vs CM3, digits 0-6, judged class accuracy",
                                 values("racm3_k2", "seen", task, metric),
                                 values("cm3_k0", "seen", task, metric), expect_no_difference=True))
    accuracy = {k: [seed["k_shot"]["ensemble_accuracy"][k] for seed in per_seed] for k in shots}
    low, high = min(shots), max(shots)
    rows.append(paired_claim(PAPER, "k-shot in-context accuracy improves with k",
                             f"ensemble k={high} vs k={low}, digits 7-9, binary", accuracy[high],
                             accuracy[low]))
    rows.append(paired_claim(PAPER, "k-shot in-context accuracy beats chance",
                             f"ensemble k={high} vs chance 0.5, digits 7-9, binary", accuracy[high],
                             [0.5] * len(per_seed)))
    return rows


def run_inference_demo(racm3_output_dir: str, output_dir: str, quick: bool = False,
                       sizes: InferenceSizes | None = None, device: torch.device | str = "cpu",
                       workers: int | None = None) -> dict:
    """Evaluate the demo's models on ``device``; writes inference_results.json and text_to_image_grid.png.

    sizes: overrides QUICK / FULL (tests use a tiny one). workers: processes for the (seed, task)
    evaluations (on a CPU one per core by default, one thread each, like this process).
    """
    # Tiny models: one thread is as fast, and a busy 2-core machine made 2 threads 57x slower (measured).
    with one_thread():
        return _run_inference_demo(racm3_output_dir, output_dir, quick, sizes, torch.device(device), workers)


def _run_inference_demo(racm3_output_dir: str, output_dir: str, quick: bool, sizes: InferenceSizes | None,
                        device: torch.device, workers: int | None) -> dict:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    sizes = sizes or (QUICK if quick else FULL)
    os.makedirs(output_dir, exist_ok=True)
    run = load_demo_run(racm3_output_dir, device=device)
    train, held_out = run["train"], run["held_out"]
    # The independent judge: fitted on the real training pixels, apart from every model under test.
    judge = DigitJudge(train.images, train.labels)
    memory_only = torch.isin(held_out.labels, torch.tensor(run["summary"]["memory_only_classes"]))
    real_images, real_labels = held_out.images[memory_only], held_out.labels[memory_only]
    reconstructed = run["tokenizer"].decode(run["tokenizer"].encode(real_images.to(device))).cpu()
    summary = {"quick": quick, "device": str(device), "seeds": run["summary"]["seeds"],
               "attention_implementation": run["generators"]["retrieval"].config._attn_implementation,
               "threshold": run["summary"]["threshold"],
               # What a perfect generator could score: real held-out images, and their VQ reconstructions.
               "judge": {"accuracy_real_held_out": judge.accuracy(held_out.images, held_out.labels),
                         "accuracy_real_memory_only": judge.accuracy(real_images, real_labels),
                         "accuracy_vq_reconstruction_memory_only": judge.accuracy(reconstructed,
                                                                                  real_labels)},
               "loading_s": time.perf_counter() - started}
    seeds = run["summary"]["seeds"]
    # One (seed, task) per worker process; the grid comes from the first seed.
    jobs = [(racm3_output_dir, seed, task, sizes, judge, output_dir if seed == seeds[0] else None,
             str(device)) for task in TASKS for seed in seeds]
    outcomes = run_in_processes(evaluate_seed_task, jobs, workers=workers, device=str(device))
    per_seed = [{key: value for (_, seed, *_), outcome in zip(jobs, outcomes, strict=True)
                 if seed == wanted for key, value in outcome.items()} for wanted in seeds]
    summary["per_seed"] = per_seed
    for name in CONFIGURATIONS:  # seed means, for reading at a glance (the claims pair seeds)
        summary[name] = {group: {task: {metric: sum(seed[name][group][task][metric] for seed in per_seed)
                                        / len(per_seed)
                                        for metric, value in per_seed[0][name][group][task].items()
                                        if isinstance(value, float)}
                                 for task in per_seed[0][name][group]}
                         for group in per_seed[0][name]}
    k_shot = [seed["k_shot"]["ensemble_accuracy"] for seed in per_seed]
    summary["k_shot"] = {"ensemble_accuracy": {k: sum(seed[k] for seed in k_shot) / len(k_shot)
                                               for k in sizes.shots},
                         "queries_per_seed": sizes.classification_queries}
    summary["claims"] = inference_claims(per_seed, sizes.shots)
    summary["sizes"] = {**sizes.__dict__, "shots": list(sizes.shots)}
    summary["timings_s"] = {"loading_s": summary.pop("loading_s"), "total_s": time.perf_counter() - started,
                            "cpu_s": cpu_seconds() - cpu_started}
    with open(os.path.join(output_dir, "inference_results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
