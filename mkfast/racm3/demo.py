"""RA-CM3 on the digits, end to end: does retrieval lower held-out loss?

Stages: train a small VQ tokenizer (32x32 -> 8x8 codes) and a small CLIP on the
training pairs; build the memory (the training documents' mixed-modal
embeddings); train two identical generators for the same steps, one with
retrieval (K ~ U{0,1,2}) and one without (K = 0); evaluate both on held-out
documents. Held-out main-document loss is reported for image tokens and caption
tokens separately. Retrieval at evaluation follows RA-CM3's inference tasks:
image tokens are scored with documents retrieved by the caption (text-to-image),
caption tokens with documents retrieved by the image (image-to-text).

On a GPU every model trains there (the generator in bf16 autocast through mkfast's
flash attention, retrieval through mkfast's top-k kernel over a GPU-resident memory)
and the full run uses a larger generator for more steps (:data:`GPU_FULL`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from mkfast.racm3.components import COMPONENTS_FILE, DEMO_TEXT_VOCABULARY, DEMO_VQ, IMAGE_SIZE, cpu_state
from mkfast.racm3.encoder import CLIPTrainingConfig, MixedModalEncoder, SmallCLIPConfig, build_small_clip, train_clip
from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.image_tokenizer import VQGAN, VQTrainingConfig, train_image_tokenizer
from mkfast.racm3.retrieval import (
    IGNORE,
    MAX_RETRIEVED,
    ROLE_MAIN,
    RetrievalCorpus,
    SequenceOptions,
    token_losses,
)
from mkfast.racm3.trainer import Trainer, TrainingConfig, plot_losses
from mkfast.racm3.vocabulary import PART_IMAGE, PART_TEXT, CM3Vocabulary

EVALUATION_CHUNK = 32


@dataclass
class DemoSizes:
    vq_steps: int
    vq_batch_size: int
    clip_steps: int
    generator_steps: int
    batch_size: int
    held_out_documents: int | None  # None: all
    learning_rate: float = 3e-3  # small model, few steps: well above RA-CM3's 1e-4
    warmup_steps: int = 20
    # Documents here are ~75 tokens; 3 of them fit in 256 (RA-CM3: 3 in 4096).
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(max_sequence_length=256))


# Quick: ~15 s on an idle 2-core CPU (the budget is 60 s); it checks the pipeline, not the claim.
QUICK = DemoSizes(vq_steps=40, vq_batch_size=16, clip_steps=30, generator_steps=30, batch_size=16,
                  held_out_documents=48)
# Full: about 250 CPU-seconds of work (VQ ~0.27 s/step, generator ~0.2 s/step with retrieval on one core),
# inside the 8-minute budget on 2 cores with room for a busy machine.
FULL = DemoSizes(vq_steps=250, vq_batch_size=32, clip_steps=150, generator_steps=500, batch_size=16,
                 held_out_documents=None)
# Full on a GPU: a ~5M-parameter generator (hidden 256, 6 layers), 4x the batch, 4x the steps.
# Sized from the CPU timings, not measured on a GPU (none was available when it was written).
GPU_FULL = DemoSizes(vq_steps=1000, vq_batch_size=64, clip_steps=600, generator_steps=2000, batch_size=64,
                     held_out_documents=None, learning_rate=1e-3, warmup_steps=100,
                     generator=GeneratorConfig(hidden_size=256, num_layers=6, num_heads=8, num_key_value_heads=8,
                                               intermediate_size=688, max_sequence_length=256))


def demo_sizes(quick: bool, device: torch.device | str) -> DemoSizes:
    """QUICK checks the pipeline on any device; the full run grows on a GPU."""
    if quick:
        return QUICK
    return GPU_FULL if torch.device(device).type == "cuda" else FULL


@torch.no_grad()
def evaluate_main_loss(model, corpus: RetrievalCorpus, texts: list[str], images: torch.Tensor, codes: torch.Tensor,
                       query_part: str, retrieved_count: int, options: SequenceOptions) -> dict[str, float]:
    """Mean cross-entropy of the main documents' image tokens and caption tokens (nats / token)."""
    model.eval()
    device = next(model.parameters()).device
    sums = {"image": 0.0, "text": 0.0}
    counts = {"image": 0, "text": 0}
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(texts), EVALUATION_CHUNK):
        stop = start + EVALUATION_CHUNK
        batch = corpus.evaluation_batch(texts[start:stop], images[start:stop], codes[start:stop], query_part,
                                        retrieved_count, options, generator).to(device)
        # Right padding: the causal mask suffices (see trainer); no KV cache is built for one pass.
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        losses = token_losses(logits, batch.labels)
        main = (batch.labels != IGNORE) & (batch.target_roles == ROLE_MAIN)
        for name, part in (("image", PART_IMAGE), ("text", PART_TEXT)):
            selected = main & (batch.target_parts == part)
            sums[name] += float(losses[selected].sum())
            counts[name] += int(selected.sum())
    return {name: sums[name] / max(1, counts[name]) for name in sums}


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, progress: bool = False,
             device: torch.device | str = "cpu") -> dict:
    """Train tokenizer, CLIP and two generators (with / without retrieval); write results.json and PNGs."""
    from mkfast.data.digits import load_digits_pairs

    device = torch.device(device)
    sizes = demo_sizes(quick, device)
    os.makedirs(output_dir, exist_ok=True)
    timings, started = {}, time.perf_counter()
    torch.manual_seed(seed)
    train, held_out = load_digits_pairs(image_size=IMAGE_SIZE, seed=seed)

    tokenizer = VQGAN(DEMO_VQ).to(device)
    vq_training = VQTrainingConfig(steps=sizes.vq_steps, batch_size=sizes.vq_batch_size, seed=seed)
    vq_losses = train_image_tokenizer(tokenizer, train.images, vq_training, progress=progress)
    train_codes, held_out_codes = tokenizer.encode(train.images), tokenizer.encode(held_out.images)
    timings["vq_tokenizer_s"] = time.perf_counter() - started

    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(image_size=IMAGE_SIZE))).to(device)
    clip_losses = train_clip(encoder, train.images, train.captions,
                             CLIPTrainingConfig(steps=sizes.clip_steps, seed=seed), progress=progress)
    timings["clip_s"] = time.perf_counter() - started - timings["vq_tokenizer_s"]

    vocabulary = CM3Vocabulary.from_corpus(train.captions, DEMO_VQ.codebook_size, DEMO_TEXT_VOCABULARY)
    # The same components file `mkfast train racm3` writes, so inference loads a demo run like a command run.
    torch.save({"vq": cpu_state(tokenizer), "clip": cpu_state(encoder.clip), "vocabulary": vocabulary.to_json()},
               os.path.join(output_dir, COMPONENTS_FILE))
    corpus = RetrievalCorpus(vocabulary, encoder, train.captions, train.images, train_codes, memory_device=device)
    held = slice(0, sizes.held_out_documents)
    held_texts, held_images, held_codes = held_out.captions[held], held_out.images[held], held_out_codes[held]
    options = SequenceOptions(max_sequence_length=sizes.generator.max_sequence_length)

    runs = {}
    for name, max_retrieved in (("retrieval", MAX_RETRIEVED), ("no_retrieval", 0)):
        run_started = time.perf_counter()
        torch.manual_seed(seed)  # identical initial weights for both runs
        model = build_generator(len(vocabulary), sizes.generator, pad_token_id=vocabulary.pad_id, device=device)
        config = TrainingConfig(steps=sizes.generator_steps, batch_size=sizes.batch_size,
                                learning_rate=sizes.learning_rate, warmup_steps=sizes.warmup_steps,
                                checkpoint_every=max(sizes.generator_steps, 1), seed=seed,
                                output_dir=os.path.join(output_dir, name), progress=progress)
        trainer = Trainer(model, corpus, config, replace(options, max_retrieved=max_retrieved))
        records = trainer.train(resume=False)
        result = {"final_train_main_loss": sum(record["main_loss"] for record in records[-10:]) / min(10, len(records))}
        if max_retrieved:
            text_to_image = evaluate_main_loss(model, corpus, held_texts, held_images, held_codes, "text",
                                               max_retrieved, options)
            image_to_text = evaluate_main_loss(model, corpus, held_texts, held_images, held_codes, "image",
                                               max_retrieved, options)
            result["held_out_image_token_loss"] = text_to_image["image"]
            result["held_out_caption_token_loss"] = image_to_text["text"]
            result["held_out_without_retrieval"] = evaluate_main_loss(model, corpus, held_texts, held_images,
                                                                      held_codes, "text", 0, options)
        else:
            plain = evaluate_main_loss(model, corpus, held_texts, held_images, held_codes, "text", 0, options)
            result["held_out_image_token_loss"] = plain["image"]
            result["held_out_caption_token_loss"] = plain["text"]
        result["seconds"] = time.perf_counter() - run_started
        runs[name] = result

    plot_losses({name: os.path.join(output_dir, name, "metrics.jsonl") for name in runs},
                os.path.join(output_dir, "loss_comparison.png"))
    summary = {
        "quick": quick,
        "device": str(device),
        "attention_implementation": model.config._attn_implementation,
        "generator": asdict(sizes.generator),
        "train_documents": len(train),
        "held_out_documents": len(held_texts),
        "generator_steps": sizes.generator_steps,
        "batch_size": sizes.batch_size,
        "vocabulary_size": len(vocabulary),
        "vq_final_loss": vq_losses[-1] if vq_losses else None,
        "clip_final_loss": clip_losses[-1] if clip_losses else None,
        "runs": runs,
        "timings_s": {**timings, "total_s": time.perf_counter() - started},
    }
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
