"""`mkfast train racm3`: the whole RA-CM3 training pipeline as one command.

    mkfast train racm3 --config run.json            # single process
    torchrun --nproc_per_node 2 -m mkfast.racm3.commands --config run.json   # DDP

The config is :class:`RunConfig` as JSON (nested objects for the nested
dataclasses; every field optional); a few flags override its fields 1:1.
Stages: the image tokenizer (trained, or a taming checkpoint), the CLIP encoder
(trained small, or an open_clip model from a local checkpoint), the vocabulary,
then the generator with retrieval. The first three are saved in output_dir on
the first run and reloaded afterwards, so a resumed run sees the same codes,
memory and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import torch

from mkfast.distributed import init_from_environment, shutdown
from mkfast.racm3.demo import COMPONENTS_FILE, DEMO_TEXT_VOCABULARY, DEMO_VQ, IMAGE_SIZE
from mkfast.racm3.encoder import CLIPTrainingConfig, MixedModalEncoder, SmallCLIPConfig, build_small_clip, train_clip
from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.image_tokenizer import (
    VQGAN,
    VQGANConfig,
    VQTrainingConfig,
    load_taming_checkpoint,
    train_image_tokenizer,
)
from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions
from mkfast.racm3.trainer import Trainer, TrainingConfig
from mkfast.racm3.vocabulary import CM3Vocabulary


@dataclass
class RunConfig:
    # "digits" (embedded demo set), a folder holding captions.jsonl, or webdataset shards ("shards/*.tar")
    data: str = "digits"
    data_limit: int | None = None  # use the first N training pairs (smoke runs)
    image_size: int = IMAGE_SIZE
    vq: VQGANConfig = field(default_factory=lambda: DEMO_VQ)
    vq_checkpoint: str | None = None  # a taming-transformers checkpoint; skips tokenizer training
    vq_training: VQTrainingConfig = field(default_factory=VQTrainingConfig)
    clip_model: str | None = None  # an open_clip model name (e.g. "ViT-L-14"); None: the small CLIP
    clip_checkpoint: str | None = None  # local weights for clip_model
    clip: SmallCLIPConfig = field(default_factory=SmallCLIPConfig)
    clip_training: CLIPTrainingConfig = field(default_factory=CLIPTrainingConfig)
    text_vocabulary_size: int = DEMO_TEXT_VOCABULARY
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(max_sequence_length=256))
    sequence: SequenceOptions = field(default_factory=lambda: SequenceOptions(max_sequence_length=256))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(learning_rate=3e-3, warmup_steps=20))


def _from_dict(cls, values: dict):
    """Build dataclass ``cls`` from a (nested) dict, keeping defaults for missing keys."""
    instance = cls()
    for item in fields(cls):
        if item.name not in values:
            continue
        value = values[item.name]
        current = getattr(instance, item.name)
        if is_dataclass(current) and isinstance(value, dict):
            value = _from_dict(type(current), {**asdict(current), **value})
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        setattr(instance, item.name, value)
    return instance


def load_config(path: str | None, overrides: dict) -> RunConfig:
    values = {}
    if path:
        with open(path) as handle:
            values = json.load(handle)
    config = _from_dict(RunConfig, values)
    for name, value in overrides.items():
        if value is None:
            continue
        section, _, attribute = name.rpartition(".")
        setattr(getattr(config, section) if section else config, attribute, value)
    return config


def load_pairs(config: RunConfig):
    """The training split of the configured data as an ImageCaptionSplit."""
    if config.data == "digits":
        from mkfast.data.digits import load_digits_pairs

        train, _ = load_digits_pairs(image_size=config.image_size, seed=config.training.seed)
    elif config.data.endswith(".tar") or "*" in config.data:
        from mkfast.data.pairs import load_webdataset_shards

        train = load_webdataset_shards(config.data, image_size=config.image_size, limit=config.data_limit)
    else:
        from mkfast.data.pairs import load_image_folder

        train = load_image_folder(config.data, image_size=config.image_size, limit=config.data_limit)
    if config.data_limit:
        train = type(train)(train.images[:config.data_limit], train.labels[:config.data_limit],
                            train.captions[:config.data_limit])
    return train


def build_components(config: RunConfig, train, progress: bool = True) -> dict:
    """Train (or load) the tokenizer and CLIP and build the vocabulary; returns a saveable dict."""
    torch.manual_seed(config.training.seed)
    if config.vq_checkpoint:
        tokenizer = load_taming_checkpoint(config.vq_checkpoint, config.vq)
    else:
        tokenizer = VQGAN(config.vq)
        train_image_tokenizer(tokenizer, train.images, config.vq_training, progress=progress)
    if config.clip_model:
        encoder = MixedModalEncoder.from_pretrained(config.clip_model, config.clip_checkpoint)
    else:
        encoder = MixedModalEncoder(build_small_clip(config.clip))
        train_clip(encoder, train.images, train.captions, config.clip_training, progress=progress)
    vocabulary = CM3Vocabulary.from_corpus(train.captions, config.vq.codebook_size, config.text_vocabulary_size)
    return {"vq": tokenizer.state_dict(), "clip": None if config.clip_model else encoder.clip.state_dict(),
            "vocabulary": vocabulary.to_json()}


def restore_components(config: RunConfig, components: dict):
    tokenizer = VQGAN(config.vq)
    tokenizer.load_state_dict(components["vq"])
    if config.clip_model:
        encoder = MixedModalEncoder.from_pretrained(config.clip_model, config.clip_checkpoint)
    else:
        encoder = MixedModalEncoder(build_small_clip(config.clip))
        encoder.clip.load_state_dict(components["clip"])
    return tokenizer.eval(), encoder.eval(), CM3Vocabulary.from_json(components["vocabulary"])


def train_racm3(config: RunConfig) -> list[dict]:
    """Run (or resume) the pipeline; returns this process's per-step records."""
    rank, world_size = init_from_environment(torch.cuda.is_available())
    config.training.progress = config.training.progress and rank == 0
    os.makedirs(config.training.output_dir, exist_ok=True)
    components_path = os.path.join(config.training.output_dir, COMPONENTS_FILE)
    train = load_pairs(config)
    if rank == 0 and not os.path.exists(components_path):
        torch.save(build_components(config, train, config.training.progress), components_path + ".tmp")
        os.replace(components_path + ".tmp", components_path)
        with open(os.path.join(config.training.output_dir, "config.json"), "w") as handle:
            json.dump(asdict(config), handle, indent=2)
    if world_size > 1:
        torch.distributed.barrier()
    components = torch.load(components_path, map_location="cpu", weights_only=False)
    tokenizer, encoder, vocabulary = restore_components(config, components)
    corpus = RetrievalCorpus(vocabulary, encoder, train.captions, train.images, tokenizer.encode(train.images))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.training.seed)
    model = build_generator(len(vocabulary), config.generator, vocabulary.pad_id, device=device)
    records = Trainer(model, corpus, config.training, config.sequence).train(resume=True)
    shutdown()
    return records


OVERRIDE_FLAGS = {
    "--output-dir": ("training.output_dir", str),
    "--data": ("data", str),
    "--data-limit": ("data_limit", int),
    "--steps": ("training.steps", int),
    "--batch-size": ("training.batch_size", int),
    "--checkpoint-every": ("training.checkpoint_every", int),
    "--seed": ("training.seed", int),
    "--max-retrieved": ("sequence.max_retrieved", int),
    "--vq-steps": ("vq_training.steps", int),
    "--clip-steps": ("clip_training.steps", int),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="RunConfig as JSON (all fields optional)")
    for flag, (name, kind) in OVERRIDE_FLAGS.items():
        parser.add_argument(flag, type=kind, dest=name, help=f"overrides {name}")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the generator with FSDP2 instead of replicating it (DDP)")


def add_train_parser(train_targets) -> None:
    """Register ``racm3`` under ``mkfast train``."""
    parser = train_targets.add_parser("racm3", help="RA-CM3: tokenizer, CLIP retriever, retrieval-augmented generator",
                                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def run_from_arguments(arguments: argparse.Namespace) -> None:
    overrides = {name: getattr(arguments, name) for name, _ in OVERRIDE_FLAGS.values()}
    config = load_config(arguments.config, overrides)
    if arguments.no_progress:
        config.training.progress = False
    if arguments.fsdp:
        config.training.fsdp = True
    records = train_racm3(config)
    if records and int(os.environ.get("RANK", "0")) == 0:
        print(f"racm3: trained to step {records[-1]['step'] + 1}, last loss {records[-1]['loss']:.4f}; "
              f"outputs in {config.training.output_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mkfast train racm3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    main()
