"""Patching a Hugging Face Llama in place: visual memory (stage 1) and MoMEs (stage 2).

A transformers Llama decoder layer (4.46 through 5.x) ends with

    residual = h_s
    hidden = residual + self.mlp(self.post_attention_layernorm(h_s))

so the patch never touches the layer's forward. It swaps two submodules:
``post_attention_layernorm`` becomes ``nn.Identity`` and ``mlp`` becomes a module
that receives h_s itself and returns everything the block adds to it:

- visual memory (MKS2 eq. 1):  h_F = h_s + MVM(norm(h_s));  out = h_F + MLP(post_norm(h_F)),
  so the new mlp returns MVM(norm(h_s)) + MLP(post_norm(h_F));
- MoMEs (MKS2 eq. 3-4):  h_o = h_s + S_1 h_VE + S_2 h_TE, the new mlp is MoMEFFN.

The original mlp and norm objects are kept (same tensors, frozen) inside the new
module, so undoing the patch puts them back exactly. Parameter names of the base
model change while patched (``layers.0.mlp.mlp.gate_proj``): save adapters with
``mkfast.mks2.adapters.save_adapters`` and the base model only when unpatched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mkfast.layers import MoMEFFN, VisualMemory

VISUAL_MEMORY = "visual_memory"
MOMES = "momes"


class VisualMemoryFeedForward(nn.Module):
    """Takes a decoder layer's ``mlp`` slot while its ``post_attention_layernorm`` is Identity.

    forward(h_s: (B, S, H)) -> (B, S, H): MVM(norm(h_s)) + MLP(post_norm(h_s + MVM(norm(h_s)))),
    which the layer adds to h_s, giving h_F + MLP(post_norm(h_F)) (MKS2 eq. 1, then the block's MLP).
    """

    def __init__(self, mlp: nn.Module, post_attention_layernorm: nn.Module, visual_memory: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.post_attention_layernorm = post_attention_layernorm
        self.visual_memory = visual_memory

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        memory_output = self.visual_memory(hidden_states)
        fused = hidden_states + memory_output
        return memory_output + self.mlp(self.post_attention_layernorm(fused))


@contextlib.contextmanager
def seeded(seed: int):
    """New modules initialise from ``seed`` alone; every generator ``torch.manual_seed`` reseeds
    (the CPU's and each GPU's) is restored afterwards."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a LlamaForCausalLM-like model (``model.model.layers``) or of a bare LlamaModel."""
    for candidate in (getattr(getattr(model, "model", None), "layers", None), getattr(model, "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            layers = list(candidate)
            break
    else:
        raise TypeError(f"mks2: expected a LlamaForCausalLM-like model with model.layers, got {type(model).__name__}")
    for index, layer in enumerate(layers):
        for attribute in ("mlp", "post_attention_layernorm", "self_attn"):
            if not hasattr(layer, attribute):
                raise TypeError(f"mks2: decoder layer {index} ({type(layer).__name__}) has no {attribute!r}; "
                                "only Llama-style blocks (attention, post-attention norm, MLP) can be patched")
    return layers


def patch_state(model: nn.Module) -> str | None:
    """None (unpatched), "visual_memory" or "momes"."""
    first = decoder_layers(model)[0].mlp
    if isinstance(first, VisualMemoryFeedForward):
        return VISUAL_MEMORY
    if isinstance(first, MoMEFFN):
        return MOMES
    return None


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    return int(decoder_layers(model)[0].post_attention_layernorm.weight.shape[0])


def add_visual_memory(model: nn.Module, ratio: float = 0.25, freeze_base: bool = True) -> nn.Module:
    """Insert a VisualMemory (MVM, inner size ``ratio * hidden_size``) in every decoder layer, in place.

    The MVM's second projection starts at zero, so the patched model's logits equal
    the original's bit for bit. With ``freeze_base`` every other parameter of the
    model is frozen and only the MVMs train (stage 1). Returns the model.
    """
    if patch_state(model) is not None:
        raise RuntimeError(f"mks2: model already patched ({patch_state(model)}); call remove_visual_memory first")
    hidden_size = _hidden_size(model)
    # The memory's own RMSNorm uses the model's epsilon (Llama-2: 1e-5 or 1e-6 depending on the release).
    eps = float(getattr(getattr(model, "config", None), "rms_norm_eps", 1e-6))
    if freeze_base:
        _freeze(model)
    for layer in decoder_layers(model):
        reference_weight = layer.post_attention_layernorm.weight
        visual_memory = VisualMemory(hidden_size, ratio=ratio, eps=eps).to(device=reference_weight.device,
                                                                   dtype=reference_weight.dtype)
        layer.mlp = VisualMemoryFeedForward(layer.mlp, layer.post_attention_layernorm, visual_memory)
        layer.post_attention_layernorm = nn.Identity()
    model.mks2_visual_memory_ratio = ratio
    return model


def remove_visual_memory(model: nn.Module) -> nn.Module:
    """Undo ``add_visual_memory`` (and ``enable_momes`` first if it is on), in place. Returns the model."""
    if patch_state(model) == MOMES:
        disable_momes(model)
    if patch_state(model) != VISUAL_MEMORY:
        raise RuntimeError("mks2: model has no visual memory to remove")
    for layer in decoder_layers(model):
        wrapper = layer.mlp
        layer.mlp = wrapper.mlp
        layer.post_attention_layernorm = wrapper.post_attention_layernorm
    del model.mks2_visual_memory_ratio
    return model


def visual_memories(model: nn.Module) -> list[nn.Module]:
    """The VisualMemory of each decoder layer (visual-memory or MoMEs state)."""
    if patch_state(model) is None:
        raise RuntimeError("mks2: model has no visual memory")
    return [layer.mlp.visual_memory for layer in decoder_layers(model)]


def router_probabilities(mome: MoMEFFN, hidden_states: torch.Tensor) -> torch.Tensor:
    """S = softmax(W_s x + b_s) (MKS2 eq. 3) of one MoMEFFN for h_s: (..., d) -> (..., 2) fp32;
    column 0 weighs the visual expert, column 1 the text expert. x is the block's post-attention norm of h_s."""
    dtype = mome.router.weight.dtype
    return torch.softmax(mome.router(mome.norm(hidden_states.to(dtype)).to(dtype)).float(), dim=-1)


def enable_momes(model: nn.Module, rank: int = 8, alpha: float = 16) -> nn.Module:
    """Replace each layer's MVM-then-MLP by the MoMEFFN soft mixture, in place (stage 2).

    h_o = h_s + S_1 * h_VE + S_2 * h_TE (MKS2 eq. 3-4) with LoRA of ``rank``/``alpha`` on every
    projection of both experts and a trainable router; every other parameter of the model
    is frozen. Needs ``add_visual_memory`` first. Returns the model.
    """
    state = patch_state(model)
    if state == MOMES:
        raise RuntimeError("mks2: MoMEs are already enabled; call disable_momes first")
    if state != VISUAL_MEMORY:
        raise RuntimeError("mks2: enable_momes needs the visual memory: call add_visual_memory first")
    _freeze(model)
    for layer in decoder_layers(model):
        wrapper = layer.mlp
        layer.mlp = MoMEFFN(wrapper.mlp, wrapper.visual_memory, wrapper.post_attention_layernorm,
                            rank=rank, alpha=alpha)
    model.mks2_mome_rank = rank
    model.mks2_mome_alpha = alpha
    return model


def disable_momes(model: nn.Module) -> nn.Module:
    """Back from MoMEs to visual memory + MLP, in place (LoRA and router are dropped). Returns the model."""
    if patch_state(model) != MOMES:
        raise RuntimeError("mks2: MoMEs are not enabled")
    for layer in decoder_layers(model):
        mome = layer.mlp
        layer.mlp = VisualMemoryFeedForward(mome.mlp, mome.norm, mome.visual_memory)
    del model.mks2_mome_rank, model.mks2_mome_alpha
    return model


def trainable_parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)
