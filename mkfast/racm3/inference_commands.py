"""`mkfast generate racm3 ...` and `mkfast eval racm3 ...`: RA-CM3 inference from a trained run.

    mkfast generate racm3 --run-dir RUN --caption "a handwritten digit seven" --output-dir out
    mkfast generate racm3 --run-dir RUN --image digit.png --output-dir out           # image-to-text
    mkfast generate racm3 --run-dir RUN --infill digit.png --region 2:4,0:8 --output-dir out
    mkfast eval racm3 --run-dir RUN --output-dir out [--quick]

RUN is what the RA-CM3 demo wrote (results.json, retrieval/, no_retrieval/) or
what `mkfast train racm3` wrote (components.pt, config.json, checkpoints).
Outputs: results.json and PNGs (text-to-image: every sample, and a grid of the
retrieved documents next to the samples ranked by CLIP score).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mkfast.racm3.inference import RACM3Inference, save_images
from mkfast.racm3.sampling import SamplingOptions


def load_pipeline(run_dir: str, variant: str = "retrieval", cache_dir: str | None = None) -> RACM3Inference:
    """An inference pipeline from a demo run (variant: "retrieval" | "no_retrieval") or a training run."""
    from mkfast.racm3.retrieval import RetrievalCorpus

    if os.path.exists(os.path.join(run_dir, "results.json")):
        from mkfast.racm3.inference_demo import load_demo_run

        run = load_demo_run(run_dir, cache_dir=cache_dir)
        train = run["train"]
        corpus = RetrievalCorpus(run["vocabulary"], run["encoder"], train.captions, train.images,
                                 run["tokenizer"].encode(train.images))
        return RACM3Inference(run["generators"][variant], corpus, run["tokenizer"])
    from mkfast.racm3.commands import COMPONENTS_FILE, load_config, load_pairs, restore_components
    from mkfast.racm3.generator import build_generator
    from mkfast.racm3.trainer import latest_checkpoint

    config = load_config(os.path.join(run_dir, "config.json"), {})
    tokenizer, encoder, vocabulary = restore_components(
        config, torch.load(os.path.join(run_dir, COMPONENTS_FILE), map_location="cpu", weights_only=False))
    train = load_pairs(config)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"load_pipeline: no checkpoint in {run_dir}")
    model = build_generator(len(vocabulary), config.generator, vocabulary.pad_id)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    corpus = RetrievalCorpus(vocabulary, encoder, train.captions, train.images, tokenizer.encode(train.images))
    return RACM3Inference(model, corpus, tokenizer)


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG/JPEG file -> (3, size, size) in [0, 1]."""
    import numpy
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(numpy.asarray(image, dtype=numpy.float32).copy()).permute(2, 0, 1) / 255.0


def parse_region(text: str, side: int) -> torch.Tensor:
    """"r0:r1,c0:c1" in code-grid units -> (side, side) bool mask of that rectangle."""
    try:
        rows, columns = (tuple(int(value) for value in part.split(":")) for part in text.split(","))
    except ValueError as error:
        raise ValueError(f"--region must look like r0:r1,c0:c1, got {text!r}") from error
    region = torch.zeros(side, side, dtype=torch.bool)
    region[rows[0]:rows[1], columns[0]:columns[1]] = True
    return region


def add_generate_parsers(targets) -> None:
    parser = targets.add_parser("racm3", help="RA-CM3 text-to-image, image-to-text or infilling")
    parser.add_argument("--run-dir", required=True, help="a RA-CM3 demo or `mkfast train racm3` output dir")
    parser.add_argument("--variant", default="retrieval", choices=("retrieval", "no_retrieval"),
                        help="which demo generator (demo runs only)")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--caption", help="text-to-image prompt")
    task.add_argument("--image", help="image-to-text: an image file")
    task.add_argument("--infill", help="infilling: an image file; see --region")
    parser.add_argument("--region", default=None, help="infilling region r0:r1,c0:c1 in code-grid units")
    parser.add_argument("--retrieved", type=int, default=2, help="K documents retrieved (0: none)")
    parser.add_argument("--samples", type=int, default=10, help="images (or captions) sampled")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="racm3_generated")


def add_eval_parsers(targets) -> None:
    parser = targets.add_parser("racm3", help="RA-CM3 inference metrics on the digits demo run")
    parser.add_argument("--run-dir", required=True, help="the RA-CM3 demo's output dir")
    parser.add_argument("--output-dir", default="racm3_eval")
    parser.add_argument("--quick", action="store_true", help="few prompts and samples")


def handle_generate(arguments: argparse.Namespace) -> dict:
    os.makedirs(arguments.output_dir, exist_ok=True)
    pipeline = load_pipeline(arguments.run_dir, arguments.variant, cache_dir=arguments.output_dir)
    options = SamplingOptions(arguments.temperature, arguments.top_k, arguments.top_p)
    resolution = pipeline.image_tokenizer.config.resolution
    if arguments.caption is not None:
        from mkfast.racm3.inference_demo import save_grid

        result = pipeline.text_to_image(arguments.caption, k=arguments.retrieved, num_samples=arguments.samples,
                                        options=options, seed=arguments.seed,
                                        guidance_scale=arguments.guidance_scale)
        paths = save_images(result.images, arguments.output_dir, "sample")
        save_grid([result], pipeline.corpus, os.path.join(arguments.output_dir, "grid.png"), arguments.retrieved)
        record = {"task": "text_to_image", "caption": result.caption, "retrieved": result.retrieved,
                  "retrieved_texts": [pipeline.corpus.texts[row] for row in result.retrieved],
                  "images": paths, "clip_scores": result.scores.tolist()}
    elif arguments.image is not None:
        result = pipeline.image_to_text(load_image(arguments.image, resolution), k=arguments.retrieved,
                                        num_captions=arguments.samples, options=options, seed=arguments.seed)
        record = {"task": "image_to_text", "caption": result.caption, "candidates": result.candidates,
                  "perplexities": result.perplexities, "retrieved": result.retrieved,
                  "retrieved_texts": [pipeline.corpus.texts[row] for row in result.retrieved]}
    else:
        image = load_image(arguments.infill, resolution)
        codes = pipeline.image_tokenizer.encode(image.unsqueeze(0))[0]
        region = parse_region(arguments.region or f"{codes.shape[0] // 2}:{codes.shape[0]},0:{codes.shape[1]}",
                              codes.shape[0])
        _, images = pipeline.infill_image(codes, region, k=arguments.retrieved, num_samples=arguments.samples,
                                          options=options, seed=arguments.seed)
        paths = save_images(images, arguments.output_dir, "infilled")
        record = {"task": "infill", "region": region.nonzero().tolist(), "images": paths}
    with open(os.path.join(arguments.output_dir, "results.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    print(json.dumps({key: value for key, value in record.items() if key != "region"}, indent=2))
    return record


def handle_eval(arguments: argparse.Namespace) -> dict:
    from mkfast.racm3.inference_demo import run_inference_demo

    summary = run_inference_demo(arguments.run_dir, arguments.output_dir, quick=arguments.quick)
    print(json.dumps({key: summary[key] for key in ("racm3_k2", "racm3_k0", "cm3_k0", "k_shot")}, indent=2))
    return summary
