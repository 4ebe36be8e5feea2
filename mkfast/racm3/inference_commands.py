"""`mkfast generate racm3 ...`: RA-CM3 inference from a trained run.

    mkfast generate racm3 --run-dir RUN --caption "a handwritten digit seven" --output-dir out
    mkfast generate racm3 --run-dir RUN --image digit.png --output-dir out           # image-to-text
    mkfast generate racm3 --run-dir RUN --infill digit.png --region 2:4,0:8 --output-dir out

RUN is what `mkfast train racm3` wrote (components.pt, config.json, checkpoints) or, through
the loader the CLI passes (mkfast.racm3.inference_demo_commands), what the RA-CM3 demo wrote.
Outputs: results.json and PNGs (text-to-image: every sample, and a grid of the
retrieved documents next to the samples ranked by CLIP score).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch

from mkfast.errors import UsageError
from mkfast.racm3.inference import RACM3Inference, save_images
from mkfast.racm3.sampling import SamplingOptions
from mkfast.training import atomic_write, atomic_write_text


def load_pipeline(run_dir: str) -> RACM3Inference:
    """An inference pipeline from what `mkfast train racm3` wrote in ``run_dir`` (config.json, components.pt,
    checkpoints). A demo run is loaded by mkfast.racm3.inference_demo_commands.load_pipeline."""
    from mkfast.racm3.commands import CONFIG_FILE, load_config, load_pairs
    from mkfast.racm3.components import COMPONENTS_FILE, load_components, restore_components
    from mkfast.racm3.generator import build_generator
    from mkfast.racm3.retrieval import RetrievalCorpus
    from mkfast.training import load_latest_checkpoint

    if not os.path.isdir(run_dir):
        raise UsageError(f"--run-dir {run_dir} is not a directory")
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise UsageError(f"--run-dir {run_dir} has neither results.json (an RA-CM3 demo run) nor "
                         f"{CONFIG_FILE} (a `mkfast train racm3` run)")
    config = load_config(config_path, {})
    components = load_components(os.path.join(run_dir, COMPONENTS_FILE))
    tokenizer, encoder, vocabulary = restore_components(config, components)
    train = load_pairs(config)
    found = load_latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"--run-dir {run_dir} has no generator checkpoint yet (checkpoint_*.pt)")
    model = build_generator(len(vocabulary), config.generator, vocabulary.pad_id)
    model.load_state_dict(found[1]["model"])
    corpus = RetrievalCorpus(vocabulary, encoder, train.captions, train.images,
                             tokenizer.encode(train.images))
    return RACM3Inference(model, corpus, tokenizer)


def save_grid(results: list, corpus, path: str, k: int) -> None:
    """One row per caption: the retrieved documents' images, then the samples best-first with CLIP scores."""
    from mkfast.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return

    columns = k + max(len(result.images) for result in results)
    figure, axes = plt.subplots(len(results), columns, figsize=(1.3 * columns, 1.5 * len(results)),
                                squeeze=False)
    for row, result in enumerate(results):
        panels = [(corpus.images[index], f"retrieved\n{corpus.texts[index].split()[-1]}")
                  for index in result.retrieved]
        panels += [(None, "")] * (k - len(panels))
        panels += [(image, f"CLIP {score:.1f}")
                   for image, score in zip(result.images, result.scores.tolist(), strict=True)]
        for column, axis in enumerate(axes[row]):
            axis.axis("off")
            if column < len(panels) and panels[column][0] is not None:
                axis.imshow(panels[column][0].permute(1, 2, 0).clamp(0, 1).numpy())
                axis.set_title(panels[column][1], fontsize=7)
        axes[row][0].text(-0.1, 0.5, result.caption.split()[-1], transform=axes[row][0].transAxes,
                          ha="right", va="center", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


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


def bounded(kind, low, high=None, inclusive: bool = True):
    """An argparse type: ``kind`` in [low, high] (low excluded unless ``inclusive``), else a usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        below = value < low if inclusive else value <= low
        if value != value or below or (high is not None and value > high):
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


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
    parser.add_argument("--retrieved", type=bounded(int, 0), default=2,
                        help="K documents retrieved (0: none)")
    parser.add_argument("--samples", type=bounded(int, 1), default=10, help="images (or captions) sampled")
    parser.add_argument("--temperature", type=bounded(float, 0, inclusive=False), default=1.0)
    parser.add_argument("--top-k", type=bounded(int, 0), default=0)
    parser.add_argument("--top-p", type=bounded(float, 0, 1, inclusive=False), default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="racm3_generated")


def handle_generate(arguments: argparse.Namespace, load: Callable[..., RACM3Inference] | None = None) -> dict:
    """``load(run_dir, variant, cache_dir)``: the pipeline loader (the CLI passes one that also reads demo
    runs); default: training runs only."""
    os.makedirs(arguments.output_dir, exist_ok=True)
    if load is None:
        pipeline = load_pipeline(arguments.run_dir)
    else:
        pipeline = load(arguments.run_dir, arguments.variant, cache_dir=arguments.output_dir)
    options = SamplingOptions(arguments.temperature, arguments.top_k, arguments.top_p)
    resolution = pipeline.image_tokenizer.config.resolution
    if arguments.caption is not None:
        result = pipeline.text_to_image(arguments.caption, k=arguments.retrieved,
                                        num_samples=arguments.samples, options=options, seed=arguments.seed,
                                        guidance_scale=arguments.guidance_scale)
        paths = save_images(result.images, arguments.output_dir, "sample")
        save_grid([result], pipeline.corpus, os.path.join(arguments.output_dir, "grid.png"),
                  arguments.retrieved)
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
        lower_half = f"{codes.shape[0] // 2}:{codes.shape[0]},0:{codes.shape[1]}"
        region = parse_region(arguments.region or lower_half, codes.shape[0])
        _, images = pipeline.infill_image(codes, region, k=arguments.retrieved, num_samples=arguments.samples,
                                          options=options, seed=arguments.seed)
        paths = save_images(images, arguments.output_dir, "infilled")
        record = {"task": "infill", "region": region.nonzero().tolist(), "images": paths}
    atomic_write_text(os.path.join(arguments.output_dir, "results.json"), json.dumps(record, indent=2))
    print(json.dumps({key: value for key, value in record.items() if key != "region"}, indent=2))
    return record
