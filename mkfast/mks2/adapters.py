"""Saving and loading what MKS2 adds to a base Llama, without the base model.

Format: a directory holding two files.

- ``adapter_model.safetensors``: every tensor MKS2 trains or adds, named as in
  ``MKS2Model.state_dict()``:
  ``language_model.model.layers.{i}.mlp.visual_memory.{norm,fc1,fc2}.weight`` (MVM),
  in the MoMEs state also the MoMEFFN's LoRA and router tensors under
  ``language_model.model.layers.{i}.mlp.`` (PEFT-style ``lora_A`` / ``lora_B`` names
  where the layer uses them), ``vision.projection.{weight,bias}``,
  ``vision.image_start``, ``vision.image_end``, ``text_to_image_head.weight``,
  ``logit_scale``. The base Llama's weights and the frozen BLIP-2 encoder are
  never written (they come from their own checkpoints).
- ``adapter_config.json``: how to re-create the patch before loading:
  {"format": "mkfast-mks2", "format_version": 1, "stage": "visual_memory" | "momes",
  "visual_memory_ratio", "lora_rank", "lora_alpha" (null in the visual-memory state),
  "num_hidden_layers", "hidden_size", "base_model_name_or_path", "tensor_names"}.
  Like PEFT's adapter_config.json it names the base model but does not hold it.

``load_adapters`` puts a model built with ``build_mks2`` (visual memory added) in the
saved stage (enabling MoMEs when needed) and loads every tensor, refusing any
missing or unexpected name, so logits after loading equal those at saving exactly.

The same two functions take a plain transformers causal LM patched by
``mkfast.apply_mks2`` (no vision adapter): names are then the LM's own
(``model.layers.{i}.mlp.visual_memory.fc1.weight``) and ``load_adapters`` applies the
saved patch to an unpatched LM itself, so ``mkfast.load_mks2(model, directory)``
restores a trained model in one line. ``"model_class"`` in the config says which kind
wrote the directory; a model of another kind, depth or width is refused before any change.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mkfast.files import atomic_write, atomic_write_text
from mkfast.mks2.model import MKS2Model
from mkfast.mks2.patching import (
    MOMES,
    VISUAL_MEMORY,
    VisualMemoryFeedForward,
    apply_mks2,
    decoder_layers,
    enable_momes,
    patch_state,
)

FORMAT_NAME = "mkfast-mks2"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# The frozen BLIP-2 parts of the vision adapter: loaded from BLIP-2's own checkpoint, never saved here.
FROZEN_VISION_PREFIXES = ("vision.vision_model.", "vision.qformer.", "vision.query_tokens")


def _base_modules(layer_feed_forward: nn.Module) -> list[nn.Module]:
    """The base Llama modules a patched ``mlp`` slot wraps (their tensors belong to the base checkpoint)."""
    if isinstance(layer_feed_forward, VisualMemoryFeedForward):
        return [layer_feed_forward.mlp, layer_feed_forward.post_attention_layernorm]
    return [layer_feed_forward.mlp, layer_feed_forward.norm]


def _language_model(model: nn.Module) -> nn.Module:
    """The Llama inside an MKS2Model, or the model itself (a causal LM patched by apply_mks2)."""
    return model.language_model if isinstance(model, MKS2Model) else model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of everything MKS2 adds to the base Llama and the frozen BLIP-2 (module docstring)."""
    language_model = _language_model(model)
    if patch_state(language_model) is None:
        raise RuntimeError("save_adapters: the language model has no visual memory")
    language_names = {id(tensor) for tensor in language_model.state_dict(keep_vars=True).values()}
    adapter_ids = set()
    for layer in decoder_layers(language_model):
        base_ids = {id(tensor) for base in _base_modules(layer.mlp)
                    for tensor in base.state_dict(keep_vars=True).values()}
        adapter_ids |= {id(tensor) for tensor in layer.mlp.state_dict(keep_vars=True).values()} - base_ids
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(FROZEN_VISION_PREFIXES):
            continue
        if id(tensor) in language_names and id(tensor) not in adapter_ids:
            continue
        state[name] = tensor.detach().contiguous()
    return state


def save_adapters(model: nn.Module, directory: str) -> list[str]:
    """Write adapter_model.safetensors + adapter_config.json into ``directory``; returns the tensor names."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = adapter_state_dict(model)
    language_model = _language_model(model)
    stage = patch_state(language_model)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__ if isinstance(model, MKS2Model) else "causal_lm",
        "model_type": getattr(language_model.config, "model_type", None),
        "stage": stage,
        "visual_memory_ratio": language_model.mks2_visual_memory_ratio,
        "lora_rank": getattr(language_model, "mks2_mome_rank", None),
        "lora_alpha": getattr(language_model, "mks2_mome_alpha", None),
        "num_hidden_layers": len(decoder_layers(language_model)),
        "hidden_size": language_model.config.hidden_size,
        "base_model_name_or_path": getattr(language_model.config, "_name_or_path", "") or "",
        "tensor_names": sorted(state),
    }
    # Each file whole or not at all (a kill mid-save leaves the previous one); the config, read first
    # by load_adapters, goes last.
    tensors = {name: tensor.cpu() for name, tensor in state.items()}
    metadata = {"format": FORMAT_NAME, "stage": stage}
    atomic_write(os.path.join(directory, WEIGHTS_NAME),
                 lambda temporary: save_file(tensors, temporary, metadata=metadata))
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2))
    return sorted(state)


def read_adapter_config(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG_NAME)) as handle:
        config = json.load(handle)
    if config.get("format") != FORMAT_NAME or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_adapters: {directory} is not a {FORMAT_NAME} v{FORMAT_VERSION} "
                         "adapter directory")
    return config


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model``, in place; returns it.

    ``model``: an MKS2Model built with build_mks2, or a transformers causal LM (patched by
    ``apply_mks2`` or not: an unpatched one gets the saved stage, rank and ratio applied first).
    """
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    language_model = _language_model(model)
    model_class = type(model).__name__ if isinstance(model, MKS2Model) else "causal_lm"
    saved_class = config.get("model_class", MKS2Model.__name__)
    if saved_class != model_class:
        raise ValueError(f"load_adapters: {directory} holds adapters of a {saved_class}, "
                         f"the model is a {model_class}")
    layers = len(decoder_layers(language_model))
    if config["num_hidden_layers"] != layers or config["hidden_size"] != language_model.config.hidden_size:
        raise ValueError(f"load_adapters: adapters are for {config['num_hidden_layers']} layers of size "
                         f"{config['hidden_size']}, the model has {layers} of size "
                         f"{language_model.config.hidden_size}")
    state = patch_state(language_model)
    if state is None and model_class == "causal_lm":
        apply_mks2(language_model, stage=config["stage"], rank=config["lora_rank"] or 8,
                   alpha=config["lora_alpha"] or 16, ratio=config["visual_memory_ratio"])
        state = patch_state(language_model)
    if state is None:
        raise RuntimeError("load_adapters: add the visual memory first (build_mks2 does)")
    if config["stage"] == MOMES and state == VISUAL_MEMORY:
        enable_momes(language_model, rank=config["lora_rank"], alpha=config["lora_alpha"])
    elif config["stage"] != patch_state(language_model):
        raise RuntimeError(f"load_adapters: saved in the {config['stage']} state, the model is in {state}")
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapters: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, target in expected.items():
            if target.shape != tensors[name].shape:
                raise ValueError(f"load_adapters: {name} is {tuple(tensors[name].shape)} in the file, "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(tensors[name])
    return model
