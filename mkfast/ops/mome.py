"""mome_ffn: MKS2's soft mixture of multimodal experts (MoME) over one token stream.

MKS2 stage 2 (docs/methods.md, MKS2 "Stage 2"), per token x = h_s (the block's input after
self-attention), with x_t = RMSNorm_text(x) (the block's post-attention norm)
and x_v = RMSNorm_visual(x) (the visual memory's own norm):

  text expert    h_TE = down( silu(gate(x_t)) * up(x_t) )       (Llama SwiGLU MLP)
  visual expert  h_VE = fc2( silu(fc1(x_v)) )                    (the MVM)
  every projection is frozen W0 plus LoRA:   W0 z + scale * B (A z)
  router         S = softmax(W_s x_t + b_s)                      (S in R^{m x 2})
  output         h_M = S_1 * h_VE + S_2 * h_TE                   (the caller adds h_s)

The router sees x_t, the text-normalised token: the same tensor the block's
MLP would have seen, so the router reads it in the same pass as gate/up.

Trainable: the ten LoRA matrices and the router (W_s, b_s). Frozen: both norms'
weights and the five W0; they get no gradient and none is allocated. The
gradient with respect to x is always produced (earlier layers need it).
All of them travel as one :class:`MoMEWeights`; only the custom op's boundary
sees them as flat lists.

Numerics, kept by every backend: inputs in one float dtype, GEMMs accumulate
in fp32 and round to that dtype per projection (like nn.Linear), the norms'
statistics and the router softmax in fp32 (like Llama's RMSNorm). The fused
backends round once per expert pair instead: they add both experts' router-weighted
second layers into one output (one accumulator, K = I + Iv + 2r).

Backends: "reference" (this file; backward by autograd through it), "cpu" (torch
matmuls with the fused backends' saved tensors and analytic backward, picked by auto
on CPU; mkfast/ops/mome_fused.py) and "triton" (kernels/mome.py, picked by auto on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mkfast.backend import OpDispatcher, triton_unavailable_reason
from mkfast.ops._checks import FLOAT_DTYPES, check_finite_float, check_same_size, check_tensor

# The layer's weight structure lives in mome_weights (the fused backends import it too); its public
# names stay importable from here, the op's module.
from mkfast.ops.mome_weights import FROZEN_NAMES as FROZEN_NAMES
from mkfast.ops.mome_weights import NUM_EXPERTS as NUM_EXPERTS
from mkfast.ops.mome_weights import RMS_NORM_EPS as RMS_NORM_EPS
from mkfast.ops.mome_weights import TEXT as TEXT
from mkfast.ops.mome_weights import TRAINABLE_NAMES as TRAINABLE_NAMES
from mkfast.ops.mome_weights import VISUAL as VISUAL
from mkfast.ops.mome_weights import MoMEResiduals as MoMEResiduals
from mkfast.ops.mome_weights import MoMEWeights as MoMEWeights
from mkfast.ops.mome_weights import rms_norm as rms_norm

OP = "mome_ffn"
mome_backends = OpDispatcher(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})


def _lora_linear(z, weight, lora_A, lora_B, scale) -> torch.Tensor:
    """MKS2 stage 2, "W0 x + B A x" (with PEFT's scale alpha/rank). z: (M, k) -> (M, n)."""
    return z @ weight.T + scale * ((z @ lora_A.T) @ lora_B.T)


@mome_backends.register("reference")
def mome_ffn_reference(x: torch.Tensor, weights: MoMEWeights) -> torch.Tensor:
    """The definition of the op, in plain torch (differentiable by autograd). x: (M, d) -> h_M (M, d)."""
    w, scale = weights, weights.lora_scale
    text_input, _ = rms_norm(x, w.text_norm_weight, w.text_norm_eps)
    visual_input, _ = rms_norm(x, w.visual_norm_weight, w.visual_norm_eps)
    # Text expert: Llama SwiGLU MLP with LoRA on gate, up and down.
    gate_pre = _lora_linear(text_input, w.gate_weight, w.gate_lora_A, w.gate_lora_B, scale)
    up_pre = _lora_linear(text_input, w.up_weight, w.up_lora_A, w.up_lora_B, scale)
    text_out = _lora_linear(F.silu(gate_pre) * up_pre, w.down_weight, w.down_lora_A, w.down_lora_B, scale)
    # Visual expert: the MVM two-layer FFN with LoRA on fc1 and fc2.
    visual_pre = _lora_linear(visual_input, w.fc1_weight, w.fc1_lora_A, w.fc1_lora_B, scale)
    visual_out = _lora_linear(F.silu(visual_pre), w.fc2_weight, w.fc2_lora_A, w.fc2_lora_B, scale)
    # MKS2 stage 2: S = softmax(W_s X + b_s); h_M = S_1 * h_VE + S_2 * h_TE.
    router_probs = torch.softmax((text_input @ w.router_weight.T + w.router_bias).float(), dim=-1)
    output = router_probs[:, :1] * visual_out.float() + router_probs[:, 1:] * text_out.float()
    return output.to(x.dtype)


def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "the cpu backend runs on CPU tensors only"


@mome_backends.register("cpu", _cpu_only)
def _mome_ffn_cpu(x: torch.Tensor, weights: MoMEWeights):
    from mkfast.ops.mome_fused import cpu_forward

    return cpu_forward(x, weights)


@mome_backends.register("triton", triton_unavailable_reason)
def _mome_ffn_triton(x: torch.Tensor, weights: MoMEWeights):
    # Imported on first use: Triton reads TRITON_INTERPRET when the kernels are decorated.
    from mkfast.kernels.mome import mome_forward

    output, residuals = mome_forward(x, weights)
    return output, MoMEResiduals(*residuals)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mkfast::mome_ffn", mutates_args=())
def _mome_ffn_op(
    x: torch.Tensor, frozen: list[torch.Tensor], trainable: list[torch.Tensor], floats: list[float],
    backend: str,
) -> list[torch.Tensor]:
    """(h_M, *MoMEResiduals); the residuals are empty for the reference (it recomputes in backward).

    ``backend`` is chosen by mome_ffn before the call, so it is an argument of the op: a graph
    torch.compile records (and caches) holds it, and its backward is that backend's.
    """
    weights = MoMEWeights.from_flat(frozen, trainable, floats)
    if backend == "reference":
        return [mome_ffn_reference(x, weights)]
    output, residuals = mome_backends.backends[backend].implementation(x, weights)
    return [output, *residuals]


def _residual_shapes(x, weights: MoMEWeights) -> list[tuple[tuple[int, int], torch.dtype]]:
    tokens, intermediate = x.shape[0], weights.gate_weight.shape[0]
    visual_size, rank = weights.fc1_weight.shape[0], weights.gate_lora_A.shape[0]
    wide = [(tokens, intermediate), (tokens, intermediate), (tokens, visual_size)]
    low = [(tokens, 2 * rank), (tokens, rank), (tokens, rank), (tokens, rank)]
    return [(shape, x.dtype) for shape in wide + low] + [((tokens, NUM_EXPERTS), torch.float32)] * 2


@_mome_ffn_op.register_fake
def _(x, frozen, trainable, floats, backend):
    output = [x.new_empty(x.shape)]
    if backend == "reference":
        return output
    weights = MoMEWeights.from_flat(frozen, trainable, floats)
    return output + [x.new_empty(shape, dtype=dtype) for shape, dtype in _residual_shapes(x, weights)]


def _setup_context(ctx, inputs, output):
    x, frozen, trainable, floats, backend = inputs
    ctx.backend_name = backend
    ctx.floats = floats
    ctx.counts = len(frozen), len(trainable)
    ctx.save_for_backward(x, *frozen, *trainable, *output[1:])


def _backward(ctx, output_grads):
    # The op returns a list (output, *residuals); only the output's gradient matters.
    grad_output = output_grads[0].contiguous()
    num_frozen, num_trainable = ctx.counts
    saved = ctx.saved_tensors
    x, frozen = saved[0], list(saved[1:1 + num_frozen])
    trainable = list(saved[1 + num_frozen:1 + num_frozen + num_trainable])
    residuals = list(saved[1 + num_frozen + num_trainable:])
    if ctx.backend_name == "reference":
        # Autograd through the definition, for x and the trainable weights only.
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            trainable_leaves = [tensor.detach().requires_grad_(True) for tensor in trainable]
            output = mome_ffn_reference(x_leaf, MoMEWeights.from_flat(frozen, trainable_leaves, ctx.floats))
            grads = torch.autograd.grad(output, [x_leaf, *trainable_leaves], grad_output)
    else:
        grads = torch.ops.mkfast.mome_ffn_backward(grad_output, x, frozen, trainable, residuals, ctx.floats,
                                                   ctx.backend_name)
    # needs_input_grad has the inputs' structure: (x, [frozen...], [trainable...], floats, backend).
    x_needed, _, trainable_needed, _, _ = ctx.needs_input_grad
    trainable_grads = [grad if needed else None
                       for grad, needed in zip(grads[1:], trainable_needed, strict=True)]
    return grads[0] if x_needed else None, [None] * num_frozen, trainable_grads, None, None


_mome_ffn_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mkfast::mome_ffn_backward", mutates_args=())
def _mome_ffn_backward_op(
    grad_output: torch.Tensor, x: torch.Tensor, frozen: list[torch.Tensor], trainable: list[torch.Tensor],
    residuals: list[torch.Tensor], floats: list[float], backend: str,
) -> list[torch.Tensor]:
    """Gradients of x and of the twelve trainable tensors, by the fused backend that ran forward."""
    from mkfast.ops.mome_fused import fused_backward

    weights = MoMEWeights.from_flat(frozen, trainable, floats)
    return list(fused_backward(backend, grad_output, x, weights, MoMEResiduals(*residuals)))


@_mome_ffn_backward_op.register_fake
def _(grad_output, x, frozen, trainable, residuals, floats, backend):
    return [torch.empty_like(x)] + [torch.empty_like(tensor) for tensor in trainable]


# --------------------------------------------------------------------------- public entry
def _expected_shapes(weights: MoMEWeights) -> tuple[dict[str, tuple[int, ...]], str]:
    intermediate, hidden = weights.gate_weight.shape
    visual_size, rank = weights.fc1_weight.shape[0], weights.gate_lora_A.shape[0]
    shapes = {
        "text_norm_weight": (hidden,), "visual_norm_weight": (hidden,),
        "gate_weight": (intermediate, hidden), "up_weight": (intermediate, hidden),
        "down_weight": (hidden, intermediate), "fc1_weight": (visual_size, hidden),
        "fc2_weight": (hidden, visual_size),
        "gate_lora_A": (rank, hidden), "gate_lora_B": (intermediate, rank),
        "up_lora_A": (rank, hidden), "up_lora_B": (intermediate, rank),
        "down_lora_A": (rank, intermediate), "down_lora_B": (hidden, rank),
        "fc1_lora_A": (rank, hidden), "fc1_lora_B": (visual_size, rank),
        "fc2_lora_A": (rank, visual_size), "fc2_lora_B": (hidden, rank),
        "router_weight": (NUM_EXPERTS, hidden), "router_bias": (NUM_EXPERTS,),
    }
    return shapes, f"d={hidden}, I={intermediate}, Iv={visual_size}, r={rank}"


def _validate(x: torch.Tensor, weights: MoMEWeights) -> None:
    if not isinstance(weights, MoMEWeights):
        raise TypeError(f"{OP}: weights must be a MoMEWeights, got {type(weights).__name__}")
    check_tensor(OP, "x", x, ndim=2, layout="(M, d)", dtypes=FLOAT_DTYPES)
    hidden = check_tensor(OP, "gate_weight", weights.gate_weight, ndim=2, layout="(I, d)").shape[1]
    check_same_size(OP, "last dim (d) like gate_weight's in_features", hidden, "x", x.shape[1])
    check_tensor(OP, "fc1_weight", weights.fc1_weight, ndim=2, layout="(Iv, d)")
    check_tensor(OP, "gate_lora_A", weights.gate_lora_A, ndim=2, layout="(r, d)")
    expected, sizes = _expected_shapes(weights)
    for name, shape in expected.items():
        tensor = check_tensor(OP, name, getattr(weights, name), ndim=len(shape), device=x.device)
        if tensor.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {shape} ({sizes}), got {tuple(tensor.shape)}")
    if torch.is_grad_enabled():
        for name in FROZEN_NAMES:
            if getattr(weights, name).requires_grad:
                raise ValueError(f"{OP}: {name} is frozen (MKS2 trains only LoRA and the router) and gets no "
                                 f"gradient; call requires_grad_(False) on it, got requires_grad=True")
    for name in ("lora_scale", "text_norm_eps", "visual_norm_eps"):
        value = check_finite_float(OP, name, getattr(weights, name))  # a NaN scale or eps: all-NaN output
        if name.endswith("_eps") and value < 0:
            raise ValueError(f"{OP}: {name} must be >= 0, got {value}")


def mome_ffn(x: torch.Tensor, weights: MoMEWeights) -> torch.Tensor:
    """h_M = S_1 * LoRA-MVM(x) + S_2 * LoRA-SwiGLU(x), without the residual (see the module docstring).

    Args:
        x: (..., d) fp32/fp16/bf16, h_s after self-attention.
        weights: the layer's :class:`MoMEWeights`, every tensor in x's dtype and on x's device.

    Returns:
        h_M: (..., d) in x's dtype.
    """
    check_tensor(OP, "x", x, ndim=tuple(range(1, 9)), layout="(..., d)", dtypes=FLOAT_DTYPES)
    leading = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    _validate(tokens, weights)
    # Chosen here, on the caller's thread where use_backend() is visible (backward may run on
    # an autograd thread), and passed to the op by name.
    backend = mome_backends.select(tokens.device).name
    outputs = _mome_ffn_op(tokens.contiguous(), [tensor.contiguous() for tensor in weights.frozen()],
                           [tensor.contiguous() for tensor in weights.trainable()], list(weights.floats()),
                           backend)
    return outputs[0].reshape(*leading, x.shape[-1])
