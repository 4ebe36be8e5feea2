"""RA-CM3 inference on the digits demo: text-to-image, captioning and k-shot classification, with vs without retrieval.

Reads what :func:`mkfast.racm3.demo.run_demo` trained (``racm3_output_dir``:
results.json, retrieval/ and no_retrieval/ generator checkpoints) or what
``mkfast train racm3`` wrote (components.pt, config.json, checkpoints). The RA-CM3
demo does not save its VQ tokenizer, CLIP and vocabulary; when no components.pt
is found they are rebuilt by replaying the demo's stages with its seed and sizes
(deterministic on one machine; the replay is checked by recomputing a held-out
loss the demo recorded) and saved as ``racm3_output_dir/components.pt`` (or
``output_dir/components.pt`` when the run dir is read-only) for the next call.

Reported (held-out digits; the paper's numbers are at 2.7B / LAION scale):
  - text-to-image: CLIP score of the reranked best image, CLIP digit accuracy (the
    best image's closest caption among the 10 digit captions is the prompt), FID on
    the retriever's CLIP image features (not Inception: no weights here);
  - image-to-text: exact caption accuracy, digit-name accuracy (last word) and CIDEr-D
    of the lowest-perplexity caption;
  - configurations: the retrieval-trained model with K = 2 and K = 0 retrieved
    documents, and the model trained without retrieval (CM3) with K = 0;
  - k-shot classification with nonsense labels, k = 1, 2, 4, 8: the ensemble of k
    one-shot prompts and the single k-shot prompt.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass

import torch

from mkfast.progress import progress_bar
from mkfast.racm3.inference import NONSENSE_LABELS, RACM3Inference
from mkfast.racm3.inference_commands import save_grid
from mkfast.racm3.metrics import CLIPImageFeatures, accuracy, cider_d, clip_scores, fid, normalise_caption

COMPONENTS_FILE = "components.pt"
SHOTS = (1, 2, 4, 8)
# Documents are ~75 tokens; the demo generator was trained on 256-token sequences (3 documents).
TRAINED_SEQUENCE_LENGTH = 256
# Digit captions are 4-6 BPE tokens; 16 lets a wrong caption run on without wasting steps.
DEMO_MAX_CAPTION_TOKENS = 16


@dataclass
class InferenceSizes:
    captions: int  # text-to-image prompts (held-out captions)
    image_samples: int  # images sampled per caption (RA-CM3: 10)
    images: int  # image-to-text queries
    caption_samples: int  # captions sampled per image (RA-CM3: 32)
    classification_queries: int
    shots: tuple[int, ...] = SHOTS


QUICK = InferenceSizes(captions=6, image_samples=4, images=6, caption_samples=6, classification_queries=12)
FULL = InferenceSizes(captions=40, image_samples=10, images=40, caption_samples=32, classification_queries=100)


# ----------------------------------------------------------------------------- loading
def _latest_checkpoint(directory: str) -> str:
    paths = sorted(glob.glob(os.path.join(directory, "checkpoint_*.pt")))
    if not paths:
        raise FileNotFoundError(f"no checkpoint_*.pt in {directory}")
    return paths[-1]


def replay_demo_components(quick: bool, seed: int):
    """The demo's tokenizer, CLIP and vocabulary, rebuilt with its seed and sizes (see the module docstring)."""
    from mkfast.data.digits import load_digits_pairs
    from mkfast.racm3.demo import DEMO_TEXT_VOCABULARY, DEMO_VQ, IMAGE_SIZE, demo_sizes
    from mkfast.racm3.encoder import (
        CLIPTrainingConfig,
        MixedModalEncoder,
        SmallCLIPConfig,
        build_small_clip,
        train_clip,
    )
    from mkfast.racm3.image_tokenizer import VQGAN, VQTrainingConfig, train_image_tokenizer
    from mkfast.racm3.vocabulary import CM3Vocabulary

    sizes = demo_sizes(quick, "cpu")  # only CPU runs replay (see load_demo_run)
    torch.manual_seed(seed)  # same order of random draws as run_demo
    train, _ = load_digits_pairs(image_size=IMAGE_SIZE, seed=seed)
    tokenizer = VQGAN(DEMO_VQ)
    train_image_tokenizer(tokenizer, train.images,
                          VQTrainingConfig(steps=sizes.vq_steps, batch_size=sizes.vq_batch_size, seed=seed))
    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(image_size=IMAGE_SIZE)))
    train_clip(encoder, train.images, train.captions, CLIPTrainingConfig(steps=sizes.clip_steps, seed=seed))
    vocabulary = CM3Vocabulary.from_corpus(train.captions, DEMO_VQ.codebook_size, DEMO_TEXT_VOCABULARY)
    return {"vq": tokenizer.state_dict(), "clip": encoder.clip.state_dict(), "vocabulary": vocabulary.to_json()}


def load_demo_run(racm3_output_dir: str, cache_dir: str | None = None, device: torch.device | str = "cpu") -> dict:
    """Generators ("retrieval", "no_retrieval"), tokenizer, encoder, vocabulary and the digits splits,
    the models on ``device``."""
    from mkfast.data.digits import load_digits_pairs
    from mkfast.racm3.demo import DEMO_VQ, IMAGE_SIZE
    from mkfast.racm3.encoder import MixedModalEncoder, SmallCLIPConfig, build_small_clip
    from mkfast.racm3.generator import GeneratorConfig, build_generator
    from mkfast.racm3.image_tokenizer import VQGAN
    from mkfast.racm3.vocabulary import CM3Vocabulary

    with open(os.path.join(racm3_output_dir, "results.json")) as handle:
        summary = json.load(handle)
    checkpoints = {name: torch.load(_latest_checkpoint(os.path.join(racm3_output_dir, name)), map_location="cpu",
                                    weights_only=False) for name in ("retrieval", "no_retrieval")}
    seed = int(checkpoints["retrieval"]["config"]["seed"])
    candidates = [os.path.join(racm3_output_dir, COMPONENTS_FILE)]
    if cache_dir:
        candidates.append(os.path.join(cache_dir, COMPONENTS_FILE))
    found = next((path for path in candidates if os.path.exists(path)), None)
    replayed = found is None
    if replayed and summary.get("device", "cpu") != "cpu":
        raise FileNotFoundError(f"load_demo_run: {racm3_output_dir} has no {COMPONENTS_FILE}, and a run trained on "
                                f"{summary['device']} cannot be replayed bit for bit on the CPU")
    if replayed:
        components = replay_demo_components(summary["quick"], seed)
        # Next time: found in the run dir itself (the layout `mkfast train racm3` writes), else in cache_dir.
        for path in candidates:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(components, path + ".tmp")
                os.replace(path + ".tmp", path)
                break
            except OSError:
                continue
    else:
        components = torch.load(found, map_location="cpu", weights_only=False)
    tokenizer = VQGAN(DEMO_VQ)
    tokenizer.load_state_dict(components["vq"])
    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(image_size=IMAGE_SIZE)))
    encoder.clip.load_state_dict(components["clip"])
    tokenizer, encoder = tokenizer.to(device), encoder.to(device)
    vocabulary = CM3Vocabulary.from_json(components["vocabulary"])
    if len(vocabulary) != summary["vocabulary_size"]:
        raise ValueError(f"load_demo_run: rebuilt vocabulary has {len(vocabulary)} ids, the demo's had "
                         f"{summary['vocabulary_size']}")
    # Runs that predate the recorded config used the defaults at the demo's sequence length.
    generator_config = GeneratorConfig(**summary.get("generator", {"max_sequence_length": TRAINED_SEQUENCE_LENGTH}))
    generators = {}
    for name, state in checkpoints.items():
        model = build_generator(len(vocabulary), generator_config, pad_token_id=vocabulary.pad_id, device=device)
        model.load_state_dict(state["model"])
        generators[name] = model.eval()
    train, held_out = load_digits_pairs(image_size=IMAGE_SIZE, seed=seed)
    return {"summary": summary, "generators": generators, "tokenizer": tokenizer.eval(), "encoder": encoder.eval(),
            "vocabulary": vocabulary, "train": train, "held_out": held_out, "replayed_components": replayed,
            "seed": seed}


def check_replay(run: dict, corpus, options) -> dict:
    """Recompute the held-out image-token loss the demo recorded for its no-retrieval model."""
    from mkfast.racm3.demo import evaluate_main_loss

    summary, held_out = run["summary"], run["held_out"]
    count = summary["held_out_documents"]
    codes = run["tokenizer"].encode(held_out.images[:count])
    loss = evaluate_main_loss(run["generators"]["no_retrieval"], corpus, held_out.captions[:count],
                              held_out.images[:count], codes, "text", 0, options)
    recorded = summary["runs"]["no_retrieval"]["held_out_image_token_loss"]
    return {"recomputed_image_token_loss": loss["image"], "recorded_image_token_loss": recorded,
            "matches": abs(loss["image"] - recorded) <= 1e-3 * max(1.0, abs(recorded))}


# ----------------------------------------------------------------------------- tasks
def evaluate_text_to_image(pipeline: RACM3Inference, captions: list[str], k: int, sizes: InferenceSizes,
                           all_captions: list[str], seed: int) -> tuple[dict, list]:
    results = [pipeline.text_to_image(caption, k=k, num_samples=sizes.image_samples, seed=seed + index)
               for index, caption in progress_bar(list(enumerate(captions)), desc=f"text to image, K={k}")]
    best = torch.stack([result.images[0] for result in results])
    # CLIP digit accuracy: the best image's closest caption among all digit captions is the prompt.
    scores = torch.stack([clip_scores(pipeline.encoder, best, [candidate] * len(results))
                          for candidate in all_captions], dim=1)
    closest = [all_captions[index] for index in scores.argmax(dim=1).tolist()]
    return {"clip_score_best": float(torch.stack([r.scores[0] for r in results]).mean()),
            "clip_score_all_samples": float(torch.cat([r.scores for r in results]).mean()),
            "clip_digit_accuracy": accuracy(closest, captions)}, results


def evaluate_image_to_text(pipeline: RACM3Inference, images: torch.Tensor, captions: list[str], k: int,
                           sizes: InferenceSizes, seed: int) -> dict:
    generated = [pipeline.image_to_text(image, k=k, num_captions=sizes.caption_samples, seed=seed + index,
                                        max_caption_tokens=DEMO_MAX_CAPTION_TOKENS).caption
                 for index, image in progress_bar(list(enumerate(images)), desc=f"image to text, K={k}")]
    cider, _ = cider_d(generated, [[caption] for caption in captions])
    def last_word(text: str) -> str:
        words = normalise_caption(text).split()
        return words[-1] if words else ""

    return {"caption_accuracy": accuracy([normalise_caption(text) for text in generated],
                                         [normalise_caption(text) for text in captions]),
            # Looser: the caption ends with the right digit name (the only word that differs here).
            "digit_name_accuracy": accuracy([last_word(text) for text in generated],
                                            [last_word(text) for text in captions]),
            "cider_d": cider, "examples": list(zip(captions[:4], generated[:4]))}


def evaluate_k_shot(pipeline: RACM3Inference, run: dict, query_count: int, seed: int,
                    shots: tuple[int, ...] = SHOTS) -> dict:
    """Binary tasks: the query's digit vs another digit, labels X / Y assigned at random per query."""
    train, held_out = run["train"], run["held_out"]
    generator = torch.Generator().manual_seed(seed)
    query_codes = run["tokenizer"].encode(held_out.images[:query_count])
    by_label = {label: (train.labels == label).nonzero().flatten() for label in range(10)}
    ensemble_correct = {k: [] for k in shots}
    single_correct = {k: [] for k in shots}
    for query in progress_bar(range(query_count), desc="k-shot queries"):
        true_label = int(held_out.labels[query])
        other = (true_label + 1 + int(torch.randint(0, 9, (1,), generator=generator))) % 10
        classes = [true_label, other] if bool(torch.rand((), generator=generator) < 0.5) else [other, true_label]
        target = classes.index(true_label)  # 0 -> label X, 1 -> label Y
        draws = [by_label[label][torch.randperm(len(by_label[label]), generator=generator)[:max(shots)]]
                 for label in classes]
        pairs = [tuple(pipeline.demonstration(pipeline.corpus.codes[int(draws[slot][shot])], NONSENSE_LABELS[slot])
                       for slot in range(2)) for shot in range(max(shots))]
        for k in shots:
            ensemble = pipeline.classify_ensemble(query_codes[query], pairs[:k])
            ensemble_correct[k].append(int(ensemble.prediction == target))
            single = pipeline.classify_single_prompt(query_codes[query], [d for pair in pairs[:k] for d in pair])
            single_correct[k].append(int(single.prediction == target))
    return {"ensemble_accuracy": {k: sum(v) / len(v) for k, v in ensemble_correct.items()},
            "single_prompt_accuracy": {k: sum(v) / len(v) for k, v in single_correct.items()},
            "queries": query_count,
            "note": f"single prompts for k >= 2 hold 2k+1 documents, longer than the {TRAINED_SEQUENCE_LENGTH} "
                    "tokens the demo generator was trained on"}


def run_inference_demo(racm3_output_dir: str, output_dir: str, quick: bool = False,
                       sizes: InferenceSizes | None = None, device: torch.device | str = "cpu") -> dict:
    """Evaluate the RA-CM3 demo's models on ``device``; writes inference_results.json and text_to_image_grid.png.

    sizes: overrides QUICK / FULL (tests use a tiny one).
    """
    threads = torch.get_num_threads()
    # Tiny models: one thread is as fast, and a busy 2-core machine made 2 threads 57x slower (measured).
    torch.set_num_threads(1)
    try:
        return _run_inference_demo(racm3_output_dir, output_dir, quick, sizes, torch.device(device))
    finally:
        torch.set_num_threads(threads)


def _run_inference_demo(racm3_output_dir: str, output_dir: str, quick: bool, sizes: InferenceSizes | None,
                        device: torch.device) -> dict:
    from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions

    started = time.perf_counter()
    sizes = sizes or (QUICK if quick else FULL)
    os.makedirs(output_dir, exist_ok=True)
    run = load_demo_run(racm3_output_dir, cache_dir=output_dir, device=device)
    train, held_out = run["train"], run["held_out"]
    corpus = RetrievalCorpus(run["vocabulary"], run["encoder"], train.captions, train.images,
                             run["tokenizer"].encode(train.images), memory_device=device)
    loading_s = time.perf_counter() - started
    summary = {"quick": quick, "device": str(device), "replayed_components": run["replayed_components"],
               "attention_implementation": run["generators"]["retrieval"].config._attn_implementation,
               "fid_extractor": CLIPImageFeatures(run["encoder"]).name}
    if run["replayed_components"]:
        summary["replay_check"] = check_replay(
            run, corpus, SequenceOptions(max_sequence_length=run["generators"]["retrieval"].config.max_position_embeddings))
    all_captions = sorted(set(train.captions))
    captions = held_out.captions[:sizes.captions]
    images, image_captions = held_out.images[:sizes.images], held_out.captions[:sizes.images]
    configurations = (("racm3_k2", "retrieval", 2), ("racm3_k0", "retrieval", 0), ("cm3_k0", "no_retrieval", 0))
    extractor = CLIPImageFeatures(run["encoder"])
    for name, generator_name, k in configurations:
        pipeline = RACM3Inference(run["generators"][generator_name], corpus, run["tokenizer"])
        text_to_image, results = evaluate_text_to_image(pipeline, captions, k, sizes, all_captions, run["seed"])
        best = torch.stack([result.images[0] for result in results])
        text_to_image["fid"] = fid(held_out.images[:len(best)], best, extractor)["fid"]
        summary[name] = {"text_to_image": text_to_image,
                         "image_to_text": evaluate_image_to_text(pipeline, images, image_captions, k, sizes,
                                                                 run["seed"])}
        if name == "racm3_k2":
            save_grid(results, corpus, os.path.join(output_dir, "text_to_image_grid.png"), k)
    pipeline = RACM3Inference(run["generators"]["retrieval"], corpus, run["tokenizer"])
    summary["k_shot"] = evaluate_k_shot(pipeline, run, sizes.classification_queries, run["seed"], sizes.shots)
    summary["sizes"] = {**sizes.__dict__, "shots": list(sizes.shots)}
    summary["timings_s"] = {"loading_s": loading_s, "total_s": time.perf_counter() - started}
    with open(os.path.join(output_dir, "inference_results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
