"""RA-CM3 image sampling speed: KV-cache decoding vs recomputing the whole prefix at every step.

    python -m benchmarks.bench_generation [--quick]

One setup function builds the generator (the digits demo's size, random
weights: speed does not depend on them) and the text-to-image prompt
(K retrieved documents + ``<img alt= caption src=``); both providers call
``mkfast.racm3.sampling.generate`` on the same prompt with the image-code
constraint, differing only in ``use_cache``. Tokens/s = samples x codes per
image / median time, reported in the notes and the JSON case (codes, samples).
"""

from __future__ import annotations

import functools

import torch

from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.sampling import ImageCodeConstraint, SamplingOptions, generate
from mkfast.racm3.vocabulary import IMAGE_CLOSE, IMAGE_OPEN, IMAGE_SOURCE, CM3Vocabulary

from .common import Measurement, command_line, cpu_threads, measure, resolve_device, run_suite

# The demo's generator (hidden 128, 4 layers); RoPE needs no table size, 2048 covers K=2 16x16 images.
BENCH_GENERATOR = GeneratorConfig(max_sequence_length=2048)
CODEBOOK = 64  # the demo's VQ codebook
CAPTION = "a handwritten digit seven"


def setup(codes_per_image: int, samples: int, retrieved: int, device: torch.device):
    """(model, vocabulary, prompt_ids (samples, T)) shared by both providers."""
    vocabulary = CM3Vocabulary.from_corpus([CAPTION, "a handwritten digit two"], CODEBOOK,
                                           text_vocabulary_size=280)
    torch.manual_seed(0)
    model = build_generator(len(vocabulary), BENCH_GENERATOR, vocabulary.pad_id, device=device).eval()
    special = vocabulary.special_ids
    generator = torch.Generator().manual_seed(0)
    ids = [vocabulary.separator_id]
    for _ in range(retrieved):  # retrieved documents: <img alt= caption src= codes > </doc>
        codes = torch.randint(0, CODEBOOK, (codes_per_image,), generator=generator)
        ids += [special[IMAGE_OPEN], *vocabulary.encode_text(CAPTION), special[IMAGE_SOURCE],
                *vocabulary.encode_image(codes), special[IMAGE_CLOSE], vocabulary.separator_id]
    ids += [special[IMAGE_OPEN], *vocabulary.encode_text(CAPTION), special[IMAGE_SOURCE]]
    prompt = torch.tensor(ids, device=device).unsqueeze(0).expand(samples, -1)
    return model, vocabulary, prompt


def sample_image(model, vocabulary, prompt, codes_per_image: int, use_cache: bool):
    """What both providers run: one constrained image per prompt row."""
    return generate(model, prompt, codes_per_image + 1, SamplingOptions(temperature=1.0), seed=0,
                    constraint=ImageCodeConstraint(vocabulary, codes_per_image), use_cache=use_cache)


def main(quick: bool = False, device: str | None = None, output_root: str | None = None) -> None:
    device = resolve_device(device)
    with cpu_threads(device, 1):
        _run(quick, device, output_root)


def _run(quick: bool, device: torch.device, output_root: str | None) -> None:
    # (codes per image, samples, retrieved documents): the demo's 8x8 grid at 1 and 10
    # samples (RA-CM3 samples 10 per caption), and a 16x16 grid where the prefix is longer.
    cases = [(64, 1, 0)] if quick else [(64, 1, 2), (64, 10, 2), (256, 1, 2)]
    if device.type == "cuda" and not quick:
        cases += [(1024, 10, 2)]  # RA-CM3's 32x32 grid
    measurements = []
    for codes_per_image, samples, retrieved in cases:
        model, vocabulary, prompt = setup(codes_per_image, samples, retrieved, device)
        case = {"codes": codes_per_image, "samples": samples, "K": retrieved,
                "prompt_tokens": prompt.shape[1]}
        for provider, use_cache in (("kv cache", True), ("recompute prefix", False)):
            run = functools.partial(sample_image, model, vocabulary, prompt, codes_per_image, use_cache)
            timings = measure(run, device, warmup=1, repetitions=2 if quick else 3)
            measurements.append(Measurement(case, provider, timings,
                                            work={"tokens": samples * codes_per_image}))
            print(f"{case}: {provider} {measurements[-1].rates()['tokens']:.0f} image codes/s", flush=True)
    notes = ("Image sampling (temperature 1, image-code constraint) with the demo-sized generator "
             "(hidden 128, 4 layers, random weights), one call = samples x (codes + '>') new tokens; "
             "tokens/s counts the image codes.")
    run_suite("generation", measurements, device, baseline="recompute prefix", notes=notes,
              output_root=output_root)


if __name__ == "__main__":
    command_line(main, __doc__)
