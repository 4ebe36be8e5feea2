"""`mkfast train mks2-stage1|mks2-stage2` and `mkfast eval mks2`: parsers and handlers.

Flags map one to one onto MKS2TrainConfig / MKS2EvalConfig fields; ``--config file.json``
gives defaults that flags override. Under ``torchrun`` each rank trains on its own
batches and gradients are averaged (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from mkfast.config import check_choice, check_positive, config_from_dict, read_config_file
from mkfast.distributed import init_from_environment, llama_fsdp_units, shutdown
from mkfast.errors import UsageError, pretrained_source
from mkfast.mks2.adapters import load_adapters, save_adapters
from mkfast.mks2.build import SmallLlamaConfig, build_mks2, load_llama, small_llama
from mkfast.mks2.stages import CaptionData, InstructionData, prepare_stage2, stage1_loss_fn, stage2_loss_fn
from mkfast.mks2.trainer import Trainer, TrainerConfig
from mkfast.training import atomic_write_text, config_fields

SMALL = "small"  # the language model built from config with the digits demo's word-level tokenizer
DIGITS = "digits"
SHIPPED_SET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                           "mks2_digits_multiple_choice.jsonl")
# BLIP-2's image processor normalisation (the OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_model_path(config, name: str) -> None:
    """A model path must exist (a hub id is written "hf:<org>/<name>"): checked before anything is built."""
    value = getattr(config, name)
    if value and value != SMALL:
        pretrained_source(value, f"{type(config).__name__}: {name} (--{name.replace('_', '-')})")


@dataclass
class MKS2TrainConfig:
    """Field names shared with mkfast.training.TrainingConfig mean the same there."""

    output_dir: str = "mks2_run"
    language_model: str = SMALL  # "small" or a local Llama directory
    vision_model: str = ""  # a local BLIP-2 directory; empty: a small BLIP-2-shaped encoder from config
    # "digits", or JSONL: stage 1 {"image", "caption"}, stage 2 {"prompt", "response", "image"?}
    data: str = DIGITS
    adapters_from: str = ""  # stage 2: the stage-1 run's adapters directory
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    visual_memory_ratio: float = 0.25
    lora_rank: int = 8
    lora_alpha: float = 16.0
    image_size: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    resume: bool = True
    fsdp: bool = False  # under torchrun: shard the language model with FSDP2 instead of replicating it

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "learning_rate", "gradient_accumulation",
                       "checkpoint_every", "visual_memory_ratio", "lora_rank", "image_size")
        check_positive(self, "warmup_steps", "max_grad_norm", "lora_alpha", strict=False)
        if self.visual_memory_ratio > 1:
            raise UsageError(f"MKS2TrainConfig: visual_memory_ratio (--visual-memory-ratio) must be in "
                             f"(0, 1], got {self.visual_memory_ratio!r}")
        check_choice(self, "dtype", DTYPES)
        _check_model_path(self, "language_model")
        _check_model_path(self, "vision_model")
        if self.adapters_from and not os.path.isdir(self.adapters_from):
            raise UsageError(f"MKS2TrainConfig: adapters_from (--adapters-from) {self.adapters_from!r} "
                             "is not a directory (a stage-1 run's adapters/)")
        if self.data != DIGITS and not os.path.isfile(self.data):
            raise UsageError(f"MKS2TrainConfig: data (--data) must be {DIGITS!r} or a JSONL file, "
                             f"got {self.data!r}")


@dataclass
class MKS2EvalConfig:
    adapters: str = ""  # an adapters directory (empty: the model as built, untrained)
    language_model: str = SMALL
    vision_model: str = ""
    tasks: str = f"jsonl:{SHIPPED_SET}"  # comma-separated kind:path, kind in jsonl, piqa, csqa, obqa
    limit: int = 0  # items per task (0: all)
    dtype: str = "float32"
    device: str = "cpu"
    output: str = ""  # a JSON file for the scores

    def __post_init__(self):
        check_positive(self, "limit", strict=False)
        if self.adapters and not os.path.isdir(self.adapters):
            raise UsageError(f"MKS2EvalConfig: adapters (--adapters) {self.adapters!r} is not a directory")
        check_choice(self, "dtype", DTYPES)
        _check_model_path(self, "language_model")
        _check_model_path(self, "vision_model")


def _add_dataclass_flags(parser: argparse.ArgumentParser, config_class) -> None:
    parser.add_argument("--config", help="JSON file of field values (flags override it)")
    for item in dataclasses.fields(config_class):
        flag = "--" + item.name.replace("_", "-")
        if item.type in ("bool", bool):
            parser.add_argument(flag, type=_boolean, default=None)
        else:
            caster = {"int": int, "float": float}.get(item.type if isinstance(item.type, str) else "", str)
            parser.add_argument(flag, type=caster, default=None, help=f"(default {item.default!r})")


def _boolean(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def _config_from(arguments: argparse.Namespace, config_class):
    """The config file's values, then the flags given: one typed config, checked before anything is built."""
    values = read_config_file(arguments.config) if arguments.config else {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {arguments.config}: expected a JSON object of {config_class.__name__} "
                         f"fields, got {type(values).__name__}")
    flags = {item.name: getattr(arguments, item.name) for item in dataclasses.fields(config_class)
             if getattr(arguments, item.name) is not None}
    return config_from_dict(config_class, values | flags, where=arguments.config or config_class.__name__)


def add_train_parsers(train_commands) -> None:
    for stage in ("mks2-stage1", "mks2-stage2"):
        parser = train_commands.add_parser(stage, help=f"MKS2 {stage[5:]} training")
        _add_dataclass_flags(parser, MKS2TrainConfig)


def add_eval_parsers(eval_commands) -> None:
    parser = eval_commands.add_parser("mks2", help="MKS2 zero-shot multiple choice")
    _add_dataclass_flags(parser, MKS2EvalConfig)


def _load_image(path: str, size: int, normalize: bool) -> torch.Tensor:
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    tensor = pixels.view(size, size, 3).permute(2, 0, 1) / 255.0
    if normalize:
        tensor = (tensor - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    return tensor


def _build(config, seed: int = 0):
    """(MKS2 model with visual memory, tokenizer) for a train or eval config."""
    from mkfast.data.digit_instructions import demo_vocabulary, word_level_tokenizer

    dtype = getattr(torch, config.dtype)
    if config.language_model == SMALL:
        tokenizer = word_level_tokenizer(demo_vocabulary())
        language_model = small_llama(SmallLlamaConfig(vocab_size=len(tokenizer)), tokenizer, seed=seed)
        language_model = language_model.to(dtype)
    else:
        language_model, tokenizer = load_llama(config.language_model, dtype=dtype)
    language_model.to(config.device)
    ratio = getattr(config, "visual_memory_ratio", 0.25)
    image_size = getattr(config, "image_size", 32)
    return build_mks2(language_model, config.vision_model or None, image_size, ratio, seed), tokenizer


def _stage_data(config: MKS2TrainConfig, stage: int, model):
    if config.data == DIGITS:
        from mkfast.data.digit_instructions import digits_instruction_set, ink_per_digit
        from mkfast.data.digits import load_digits_pairs

        train_split, _ = load_digits_pairs(image_size=config.image_size, seed=config.seed)
        features = model.vision.frozen_features(train_split.images)
        if stage == 1:
            return CaptionData(features, train_split.captions)
        prompts, responses, indices = digits_instruction_set(train_split, ink_per_digit(train_split),
                                                             len(train_split), config.seed)
        return InstructionData(prompts, responses, indices, features)
    from mkfast.data.multiple_choice import read_jsonl

    records = read_jsonl(config.data)
    field = "caption" if stage == 1 else "response"
    if not records:
        raise UsageError(f"mkfast train mks2-stage{stage}: data file {config.data} holds no records "
                         f"(JSONL, one object per line, with {field!r})")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or field not in record:
            raise UsageError(f"mkfast train mks2-stage{stage}: record {number} of {config.data} "
                             f"has no {field!r}")
    base = os.path.dirname(os.path.abspath(config.data))
    normalize = bool(config.vision_model)
    image_size = model.vision.vision_model.config.image_size
    paths = sorted({record["image"] for record in records if record.get("image")})
    row_of = {path: row for row, path in enumerate(paths)}
    images = None
    if paths:
        pixels = [_load_image(os.path.join(base, path), image_size, normalize) for path in paths]
        images = model.vision.frozen_features(torch.stack(pixels))
    if stage == 1:
        return CaptionData(images[torch.tensor([row_of[record["image"]] for record in records])],
                           [record["caption"] for record in records])
    return InstructionData([record["prompt"] for record in records],
                           [record["response"] for record in records],
                           [row_of[record["image"]] if record.get("image") else None for record in records],
                           images)


def run_training(config: MKS2TrainConfig, stage: int) -> dict:
    """Train one stage; writes metrics.jsonl, loss.png, checkpoint_<step>.pt and adapters/ into output_dir."""
    rank, world_size = init_from_environment(config.device.startswith("cuda"))
    if config.device.startswith("cuda") and world_size > 1:
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    torch.manual_seed(config.seed)
    model, tokenizer = _build(config, config.seed)
    if stage == 2:
        if not config.adapters_from:
            raise UsageError("mkfast train mks2-stage2: --adapters-from <stage-1 output_dir>/adapters "
                             "is required")
        load_adapters(model, config.adapters_from)
        prepare_stage2(model, rank=config.lora_rank, alpha=config.lora_alpha)
    data = _stage_data(config, stage, model)
    loss_fn = (stage1_loss_fn if stage == 1 else stage2_loss_fn)(model, tokenizer, data, config.batch_size)
    trainer_config = TrainerConfig(**config_fields(config, TrainerConfig))
    fsdp_units = None
    if config.fsdp:
        fsdp_units = llama_fsdp_units(model.language_model, embedding_looked_up_outside=True)
    trainer = Trainer(model, loss_fn, trainer_config, f"mks2-stage{stage}", fsdp_units)
    rows = trainer.train(resume=config.resume)
    if rank == 0:
        save_adapters(model, os.path.join(config.output_dir, "adapters"))
        atomic_write_text(os.path.join(config.output_dir, "train_config.json"),
                          json.dumps(dataclasses.asdict(config), indent=2))
    shutdown()
    return {"rank": rank, "world_size": world_size, "steps": len(rows),
            "final_loss": rows[-1]["loss"] if rows else None}


def run_evaluation(config: MKS2EvalConfig) -> dict:
    from mkfast.data.multiple_choice import LOADERS
    from mkfast.mks2.evaluation import evaluate_multiple_choice

    model, tokenizer = _build(config)
    if config.adapters:
        load_adapters(model, config.adapters)
    scores = {}
    for task in config.tasks.split(","):
        kind, _, path = task.partition(":")
        if kind not in LOADERS or not path:
            raise UsageError(f"mkfast eval mks2: task {task!r} must be kind:path with kind in "
                             f"{sorted(LOADERS)}")
        items = LOADERS[kind](path)
        scores[f"{kind}:{os.path.basename(path)}"] = evaluate_multiple_choice(
            model, tokenizer, items[:config.limit] if config.limit else items)
    if config.output:
        atomic_write_text(config.output, json.dumps(scores, indent=2))
    return scores


def handle_train(arguments: argparse.Namespace) -> None:
    config = _config_from(arguments, MKS2TrainConfig)
    print(json.dumps(run_training(config, 1 if arguments.target == "mks2-stage1" else 2)))


def handle_eval(arguments: argparse.Namespace) -> None:
    print(json.dumps(run_evaluation(_config_from(arguments, MKS2EvalConfig)), indent=2))
