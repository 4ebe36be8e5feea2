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
import glob
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from mkfast.config import check_positive, config_from_dict, merge, nest, read_config_file
from mkfast.distributed import init_from_environment, shutdown
from mkfast.errors import UsageError
from mkfast.racm3.components import (
    COMPONENTS_FILE,
    DEMO_TEXT_VOCABULARY,
    DEMO_VQ,
    IMAGE_SIZE,
    build_components,
    load_components,
    restore_components,
)
from mkfast.racm3.encoder import CLIPTrainingConfig, SmallCLIPConfig
from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.image_tokenizer import VQGANConfig, VQTrainingConfig
from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions
from mkfast.racm3.trainer import Trainer, TrainingConfig
from mkfast.training import atomic_torch_save, atomic_write_text, fault_point

CONFIG_FILE = "config.json"
# RunConfig fields the components are built from: a run directory's components.pt belongs to these values.
COMPONENT_FIELDS = ("data", "data_limit", "image_size", "vq", "vq_checkpoint", "vq_training", "clip_model",
                    "clip_checkpoint", "clip", "clip_training", "text_vocabulary_size")
# Names older run directories' config.json used, read as today's.
LEGACY_TRAINING_NAMES = {"grad_clip": "max_grad_norm"}


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
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(learning_rate=3e-3, warmup_steps=20))

    def __post_init__(self):
        check_positive(self, "image_size", "text_vocabulary_size")
        if self.data_limit is not None:
            check_positive(self, "data_limit")
        if self.data != "digits" and not _is_shards(self.data) and not os.path.isdir(self.data):
            raise UsageError(f"RunConfig: data (--data) must be 'digits', a folder holding captions.jsonl or "
                             f"webdataset shards ('shards/*.tar'), got {self.data!r}")
        if _is_shards(self.data) and not glob.glob(self.data):
            raise UsageError(f"RunConfig: data (--data) {self.data!r} matches no shard")
        for name in ("vq_checkpoint", "clip_checkpoint"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise UsageError(f"RunConfig: {name} {path!r} does not exist")


def _is_shards(data: str) -> bool:
    return data.endswith(".tar") or "*" in data


def load_config(path: str | None, overrides: dict) -> RunConfig:
    """RunConfig from a JSON file (every field optional) and dotted overrides ({"training.steps": 3});
    unknown keys, wrong types and out-of-range values are refused before anything is built."""
    values = read_config_file(path) if path else {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path}: expected a JSON object of RunConfig fields, "
                         f"got {type(values).__name__}")
    training = values.get("training")
    if isinstance(training, dict):
        training = {LEGACY_TRAINING_NAMES.get(key, key): value for key, value in training.items()}
        values = {**values, "training": training}
    return config_from_dict(RunConfig, merge(values, nest(overrides)), where=path or "RunConfig")


def load_pairs(config: RunConfig):
    """The training split of the configured data as an ImageCaptionSplit."""
    if config.data == "digits":
        from mkfast.data.digits import load_digits_pairs

        train, _ = load_digits_pairs(image_size=config.image_size, seed=config.training.seed)
    elif _is_shards(config.data):
        from mkfast.data.pairs import load_webdataset_shards

        train = load_webdataset_shards(config.data, image_size=config.image_size, limit=config.data_limit)
    else:
        from mkfast.data.pairs import load_image_folder

        train = load_image_folder(config.data, image_size=config.image_size, limit=config.data_limit)
    if config.data_limit:
        train = type(train)(train.images[:config.data_limit], train.labels[:config.data_limit],
                            train.captions[:config.data_limit])
    return train


def prepare_run_directory(config: RunConfig, train) -> None:
    """config.json (this run's config), then components.pt when missing, each written atomically.

    The config goes first: a kill between the two leaves a config whose components the next run
    builds (deterministically, from the same seed), never components without their config.
    Components built from other values than this config's are refused: the run needs a new directory.
    """
    output_dir = config.training.output_dir
    config_path = os.path.join(output_dir, CONFIG_FILE)
    components_path = os.path.join(output_dir, COMPONENTS_FILE)
    saved = None
    if os.path.exists(components_path) and os.path.exists(config_path):
        try:
            saved = load_config(config_path, {})
        except ValueError as error:  # a 0-byte file a kill left before it was written atomically
            warnings.warn(f"{config_path} cannot be read ({error}); writing this run's config", stacklevel=2)
    if saved is not None:
        changed = [name for name in COMPONENT_FIELDS if getattr(saved, name) != getattr(config, name)]
        if changed:
            raise UsageError(f"{output_dir} holds components built with another {changed[0]} "
                             f"({config_path}); train with a new --output-dir")
    atomic_write_text(config_path, json.dumps(asdict(config), indent=2))
    fault_point("config_written")
    if not os.path.exists(components_path):
        atomic_torch_save(build_components(config, train, config.training.progress), components_path)


def train_racm3(config: RunConfig) -> list[dict]:
    """Run (or resume) the pipeline; returns this process's per-step records."""
    rank, world_size = init_from_environment(torch.cuda.is_available())
    config.training.progress = config.training.progress and rank == 0
    os.makedirs(config.training.output_dir, exist_ok=True)
    components_path = os.path.join(config.training.output_dir, COMPONENTS_FILE)
    train = load_pairs(config)
    if rank == 0:
        prepare_run_directory(config, train)
    if world_size > 1:
        torch.distributed.barrier()
    components = load_components(components_path)
    tokenizer, encoder, vocabulary = restore_components(config, components)
    corpus = RetrievalCorpus(vocabulary, encoder, train.captions, train.images,
                             tokenizer.encode(train.images))
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
    "--gradient-accumulation": ("training.gradient_accumulation", int),
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
    parser = train_targets.add_parser(
        "racm3", help="RA-CM3: tokenizer, CLIP retriever, retrieval-augmented generator", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def run_from_arguments(arguments: argparse.Namespace) -> None:
    overrides = {name: getattr(arguments, name) for name, _ in OVERRIDE_FLAGS.values()}
    config = load_config(arguments.config, overrides)
    training = replace(config.training, progress=config.training.progress and not arguments.no_progress,
                       fsdp=config.training.fsdp or arguments.fsdp)
    config = replace(config, training=training)
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
