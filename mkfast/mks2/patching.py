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
from mkfast.layers.mome import NormGuard
from mkfast.layers.visual_memory import DEFAULT_EPS

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
        self._norm_guard = NormGuard(post_attention_layernorm)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._norm_guard.check("mks2 visual memory", hidden_states)
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
    """The decoder layers of a LlamaForCausalLM-like model (``model.model.layers``) or a bare LlamaModel."""
    for candidate in (getattr(getattr(model, "model", None), "layers", None), getattr(model, "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            layers = list(candidate)
            break
    else:
        raise TypeError("mks2: expected a LlamaForCausalLM-like model with model.layers, "
                        f"got {type(model).__name__}")
    for index, layer in enumerate(layers):
        for attribute in ("mlp", "post_attention_layernorm", "self_attn"):
            if not hasattr(layer, attribute):
                raise TypeError(f"mks2: decoder layer {index} ({type(layer).__name__}) has no {attribute!r}; "
                                "only Llama-style blocks (attention, post-attention norm, MLP) "
                                "can be patched")
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
        raise RuntimeError(f"mks2: model already patched ({patch_state(model)}); "
                           "call remove_visual_memory first")
    hidden_size = _hidden_size(model)
    # The memory's own RMSNorm uses the model's epsilon (Llama-2: 1e-5 or 1e-6 depending on the release).
    eps = float(getattr(getattr(model, "config", None), "rms_norm_eps", DEFAULT_EPS))
    if freeze_base:
        _freeze(model)
    for layer in decoder_layers(model):
        # Built where the MLP it sits beside lives, in its dtype (a bf16 model gets a bf16 memory).
        reference_weight = next(layer.mlp.parameters())
        visual_memory = VisualMemory(hidden_size, ratio=ratio, eps=eps, device=reference_weight.device,
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
        wrapper._norm_guard.release()
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
    column 0 weighs the visual expert, column 1 the text expert. x is the block's post-attention norm
    of h_s."""
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
        wrapper._norm_guard.release()
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
        mome._norm_guard.release()
        layer.mlp = VisualMemoryFeedForward(mome.mlp, mome.norm, mome.visual_memory)
    del model.mks2_mome_rank, model.mks2_mome_alpha
    return model


def trainable_parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


# --------------------------------------------------------------------------- one-call drop-in
# Decoder layers of these transformers model types compute h + mlp(post_attention_layernorm(h))
# with a Llama RMSNorm and a SwiGLU MLP: the block MKS2 patches. Tested on each (tests/test_dropin.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
UNSUPPORTED_REASONS = {
    "gemma": "Gemma's RMSNorm scales by (1 + weight) and its MLP uses GELU, while the fused MoME op "
             "computes weight * x / rms(x) and SwiGLU",
    "gemma2": "its decoder layer normalises around the MLP (pre_/post_feedforward_layernorm), "
              "not the Llama block MKS2 patches",
    "gemma3": "its decoder layer normalises around the MLP (pre_/post_feedforward_layernorm), "
              "not the Llama block MKS2 patches",
}
STAGES = (VISUAL_MEMORY, MOMES)


def check_supported_model(model: nn.Module, caller: str) -> None:
    """Refuse, saying why, a model whose blocks are not the Llama form the patch assumes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        reason = UNSUPPORTED_REASONS.get(model_type, "not a Llama-family decoder mkfast supports")
        raise TypeError(f"{caller}: model_type {model_type!r} is not supported ({reason}); "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    layer = decoder_layers(model)[0]
    for extra in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        if hasattr(layer, extra):
            raise TypeError(f"{caller}: decoder layers have {extra!r}: not the Llama block MKS2 patches")
    # Checked by value: a (1 + weight) offset (Gemma-style) would be silently dropped by the fused op.
    norm = layer.post_attention_layernorm
    weight = norm.weight.detach()
    probe = torch.linspace(-2, 2, weight.numel(), device=weight.device, dtype=torch.float32)[None]
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", DEFAULT_EPS)) or DEFAULT_EPS)
    with torch.no_grad():
        expected = weight.float() * probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
        actual = norm(probe.to(weight.dtype)).float()
    if not torch.allclose(actual, expected, rtol=2e-2, atol=2e-2):
        raise TypeError(f"{caller}: post_attention_layernorm ({type(norm).__name__}) does not compute "
                        "weight * x / rms(x) (a Gemma-style (1 + weight) offset?); MKS2's fused op would "
                        "change the model")


def apply_mks2(model: nn.Module, *, stage: str = MOMES, rank: int = 8, alpha: float = 16,
               ratio: float = 0.25, seed: int = 0) -> nn.Module:
    """Put MKS2 into a transformers Llama / Mistral / Qwen2 causal LM, in place; returns the model.

    ``stage="visual_memory"`` (MKS2 stage 1) inserts a visual memory of inner size
    ``ratio * hidden_size`` in every block and trains only those; ``stage="momes"`` (stage 2)
    also turns each block's MLP and memory into the MoMEFFN mixture with LoRA of
    ``rank``/``alpha`` and trains only the LoRA matrices and routers. New parameters are in
    the model's dtype and device and initialise from ``seed``; a fresh visual memory leaves
    the logits unchanged. Each block's ``post_attention_layernorm`` becomes ``nn.Identity``
    (the new mlp applies it). Refuses a model already patched; :func:`remove_mks2` undoes it all,
    trainability flags included.
    """
    if stage not in STAGES:
        raise ValueError(f"apply_mks2: stage must be one of {STAGES}, got {stage!r}")
    if patch_state(model) is not None:
        raise RuntimeError(f"apply_mks2: model already patched ({patch_state(model)}); "
                           "call remove_mks2 first")
    check_supported_model(model, "apply_mks2")
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    with seeded(seed):
        add_visual_memory(model, ratio=ratio, freeze_base=True)
        if stage == MOMES:
            enable_momes(model, rank=rank, alpha=alpha)
    model.mks2_base_requires_grad = trainable
    return model


def remove_mks2(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_mks2` in place: the original modules, tensors and trainability; returns the model."""
    if patch_state(model) is None:
        raise RuntimeError("remove_mks2: the model has no MKS2 patch")
    remove_visual_memory(model)
    trainable = getattr(model, "mks2_base_requires_grad", None)
    if trainable is not None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(name, parameter.requires_grad))
        del model.mks2_base_requires_grad
    return model
