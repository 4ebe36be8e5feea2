"""MoMEFFN: MKS2 stage 2's soft mixture of the text expert (LoRA-MLP) and visual expert (LoRA-MVM).

MKS2 (docs/methods.md, eqs. M5-M7): the block's MLP and its visual memory are frozen,
LoRA is added to their five projections, and a token-level router mixes them:
``h_M = S_1 * h_VE + S_2 * h_TE`` with ``S = softmax(W_s x + b_s)``. The router
sees x_t = the block's post-attention RMSNorm of h_s (what the MLP sees).
The whole layer runs as one fused op (mkfast.ops.mome_ffn).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from mkfast.layers.visual_memory import VisualMemory
from mkfast.ops._checks import FLOAT_DTYPES, check_finite_float, check_tensor
from mkfast.ops.mome import NUM_EXPERTS, MoMEWeights, mome_ffn

# (module attribute path, projection name) of the five LoRA'd projections.
PROJECTIONS = {
    "gate_proj": ("mlp", "gate_proj"), "up_proj": ("mlp", "up_proj"), "down_proj": ("mlp", "down_proj"),
    "fc1": ("visual_memory", "fc1"), "fc2": ("visual_memory", "fc2"),
}
# Names used by mkfast.ops.mome_ffn for each projection's LoRA matrices.
_OP_PREFIX = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "fc1", "fc2": "fc2"}


def _norm_eps(norm: nn.Module, dtype: torch.dtype) -> float:
    """The epsilon of a Llama-style RMSNorm module (transformers' or torch's)."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", None)
    return float(torch.finfo(dtype).eps if eps is None else eps)


class NormGuard:
    """Catches a block that still applies the norm a replacement MLP applies itself.

    A Llama block computes ``h + mlp(post_attention_layernorm(h))``. A layer that takes
    the ``mlp`` slot and normalises inside (MoMEFFN, MKS2's visual-memory wrapper) needs
    the block's ``post_attention_layernorm`` set to ``nn.Identity()``; left in place, the
    norm runs twice and the output is silently wrong. The guard remembers the norm
    module's latest output (weakly) and the owner refuses exactly that tensor as input.
    """

    def __init__(self, norm: nn.Module):
        self._last_output = None
        self._handle = norm.register_forward_hook(self._remember)

    def _remember(self, module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self._last_output = weakref.ref(output)

    def __getstate__(self) -> dict:
        # Copies and pickles start with no remembered output (a weakref does not pickle).
        return {"_last_output": None, "_handle": None}

    def release(self) -> None:
        """Remove the hook from the norm (when the owner gives the norm back)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check(self, layer: str, hidden_states: torch.Tensor) -> None:
        if self._last_output is not None and self._last_output() is hidden_states:
            raise RuntimeError(f"{layer}: its input is the output of the norm it applies itself: the block "
                               "still runs post_attention_layernorm before its mlp. Set "
                               "block.post_attention_layernorm = torch.nn.Identity() "
                               "(mkfast.apply_mks2 does)")


class MoMEFFN(nn.Module):
    """h_M = S_1 * LoRA-MVM(h_s) + S_2 * LoRA-SwiGLU(norm(h_s)); the caller adds the residual h_s.

    Args:
        mlp: a Llama-style MLP with ``gate_proj`` (d->I), ``up_proj`` (d->I), ``down_proj`` (I->d)
            nn.Linear layers without bias, computing down(silu(gate(x)) * up(x)).
        visual_memory: a :class:`VisualMemory` (its own norm + fc1 + SiLU + fc2).
        norm: the block's post-attention RMSNorm module (``weight`` (d,), and ``variance_epsilon``
            or ``eps``); the text expert and the router read its output.
        rank, alpha: LoRA rank and alpha; the update is ``(alpha / rank) * B (A x)`` (PEFT).

    Replacing a block's ``mlp``: set its ``post_attention_layernorm`` to ``nn.Identity()``, since
    this layer applies ``norm`` itself (calling it with the norm's own output is refused).
    ``visual_memory`` is moved to the MLP's dtype and device; ``norm`` must be on that device.
    The three wrapped modules are frozen (requires_grad False). Trainable parameters:
    ``<projection>_lora_A`` (rank, in) kaiming-uniform and ``<projection>_lora_B`` (out, rank)
    zeros, for projection in gate_proj, up_proj, down_proj, fc1, fc2, and ``router``
    (Linear(d, 2); output 0 weighs the visual expert, 1 the text expert).
    :meth:`adapter_state_dict` returns exactly those, for saving adapters on their own.

    Input (B, T, d) or (N, d), any float dtype: computed in the wrapped weights' dtype
    and returned in the input's.
    """

    def __init__(self, mlp: nn.Module, visual_memory: VisualMemory, norm: nn.Module, rank: int = 8,
                 alpha: float = 16):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"MoMEFFN: rank must be a positive int, got {rank!r}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(mlp, name, None)
            if not isinstance(layer, nn.Linear) or layer.bias is not None:
                raise TypeError(f"MoMEFFN: mlp.{name} must be an nn.Linear without bias, got {layer!r}")
        # The fused op computes SwiGLU with SiLU; a model configured with another hidden_act
        # (transformers' LlamaMLP.act_fn) would otherwise be silently changed. Checked by value:
        # transformers has its own SiLU classes.
        activation = getattr(mlp, "act_fn", None)
        if activation is not None:
            probe = torch.linspace(-4, 4, 17)
            if not torch.allclose(activation(probe), F.silu(probe)):
                raise TypeError("MoMEFFN: mlp.act_fn must be SiLU (the fused op computes SwiGLU), "
                                f"got {activation!r}")
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise TypeError("MoMEFFN: norm must be an RMSNorm module with a weight, "
                            f"got {type(norm).__name__}")
        weight = mlp.gate_proj.weight
        factory = dict(device=weight.device, dtype=weight.dtype)
        if norm.weight.device != weight.device:
            raise ValueError(f"MoMEFFN: norm must be on the MLP's device {weight.device}, "
                             f"got {norm.weight.device}")
        # The fused op runs in the MLP's dtype on its device: a memory built with defaults (fp32, CPU)
        # beside a bf16 GPU model is moved there once, here, instead of failing at the first forward.
        visual_memory.to(**factory)
        self.mlp, self.visual_memory, self.norm = mlp, visual_memory, norm
        for module in (mlp, visual_memory, norm):
            module.requires_grad_(False)
        self.rank, self.alpha = rank, check_finite_float("MoMEFFN", "alpha", alpha)
        self.scaling = alpha / rank
        self._norm_guard = NormGuard(norm)
        for name in PROJECTIONS:
            linear = self._linear(name)
            lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **factory))
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # PEFT's init of lora_A
            self.register_parameter(f"{name}_lora_A", lora_A)
            lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **factory))
            self.register_parameter(f"{name}_lora_B", lora_B)
        self.router = nn.Linear(linear.out_features, NUM_EXPERTS, **factory)

    def _linear(self, name: str) -> nn.Linear:
        owner, attribute = PROJECTIONS[name]
        return getattr(getattr(self, owner), attribute)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only (LoRA A/B of the five projections and the router), detached."""
        names = [f"{name}_lora_{part}" for name in PROJECTIONS for part in "AB"]
        state = {name: getattr(self, name).detach() for name in names}
        state.update({f"router.{key}": value.detach() for key, value in self.router.state_dict().items()})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned (strict: every key, no extra)."""
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            raise KeyError(f"MoMEFFN: adapter keys differ: missing {sorted(expected - set(state))}, "
                           f"unexpected {sorted(set(state) - expected)}")
        targets = {name: self.router.get_parameter(name.split(".", 1)[1]) if name.startswith("router.")
                   else getattr(self, name) for name in state}
        # Every shape first, so a wrong one loads nothing (and names its key).
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != targets[name].shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"MoMEFFN: adapter {name!r} must have shape {tuple(targets[name].shape)}, "
                                 f"got {got}")
        with torch.no_grad():
            for name, value in state.items():
                targets[name].copy_(value)

    def mome_weights(self) -> MoMEWeights:
        """This layer's weights as mkfast.ops.mome_ffn takes them (norm weights in the compute dtype)."""
        dtype = self.mlp.gate_proj.weight.dtype
        lora = {f"{prefix}_lora_{part}": getattr(self, f"{name}_lora_{part}")
                for name, prefix in _OP_PREFIX.items() for part in "AB"}
        return MoMEWeights(
            text_norm_weight=self.norm.weight.to(dtype), gate_weight=self.mlp.gate_proj.weight,
            up_weight=self.mlp.up_proj.weight, down_weight=self.mlp.down_proj.weight,
            visual_norm_weight=self.visual_memory.norm.weight.to(dtype),
            fc1_weight=self.visual_memory.fc1.weight, fc2_weight=self.visual_memory.fc2.weight,
            router_weight=self.router.weight, router_bias=self.router.bias, lora_scale=self.scaling,
            text_norm_eps=_norm_eps(self.norm, dtype),
            visual_norm_eps=_norm_eps(self.visual_memory.norm, dtype),
            **lora,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states h_s: (B, T, d) or (N, d) -> h_M, same shape and dtype, through the fused op."""
        # Checked before the cast to the weights' dtype, which would accept integers and truncate the output.
        check_tensor("MoMEFFN", "hidden_states", hidden_states, dtypes=FLOAT_DTYPES)
        self._norm_guard.check("MoMEFFN", hidden_states)
        output = mome_ffn(hidden_states.to(self.mlp.gate_proj.weight.dtype), self.mome_weights())
        return output.to(hidden_states.dtype)

    def forward_composed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The same function written as a PEFT user would: nn.Linear + LoRA modules + router, unfused.

        The baseline of benchmarks/bench_mome.py and a cross-check of the fused path in tests.
        """
        def lora_linear(name: str, inputs: torch.Tensor) -> torch.Tensor:
            lora_A, lora_B = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            return self._linear(name)(inputs) + F.linear(F.linear(inputs, lora_A), lora_B) * self.scaling

        dtype = self.mlp.gate_proj.weight.dtype
        hidden = hidden_states.to(dtype)
        text_input = self.norm(hidden).to(dtype)
        text_out = lora_linear("down_proj", F.silu(lora_linear("gate_proj", text_input))
                               * lora_linear("up_proj", text_input))
        visual_input = self.visual_memory.norm(hidden)
        visual_out = lora_linear("fc2", F.silu(lora_linear("fc1", visual_input)))
        probs = torch.softmax(self.router(text_input).float(), dim=-1)
        output = probs[..., :1] * visual_out.float() + probs[..., 1:] * text_out.float()
        return output.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
