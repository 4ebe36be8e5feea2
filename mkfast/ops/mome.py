"""mome_ffn: MKS2's soft mixture of multimodal experts (MoME) over one token stream.

MKS2 stage 2 (SPEC.md, "Stage 2"), per token x = h_s (the block's input after
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

Numerics, kept by every backend: inputs in one float dtype, GEMMs accumulate
in fp32 and round to that dtype per projection (like nn.Linear), the norms'
statistics and the router softmax in fp32 (like Llama's RMSNorm).

Backends: "reference" (this file; backward by autograd through it) and
"triton" (kernels/mome.py; fused forward and backward, picked by auto on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mkfast.backend import OpDispatcher, triton_unavailable_reason
from mkfast.ops._checks import FLOAT_DTYPES, check_same_size, check_tensor

OP = "mome_ffn"

# Argument order of the custom op: x, then the frozen weights, then the
# trainable ones, then the floats. Backward returns one gradient per argument.
FROZEN_NAMES = (
    "text_norm_weight", "gate_weight", "up_weight", "down_weight",
    "visual_norm_weight", "fc1_weight", "fc2_weight",
)
TRAINABLE_NAMES = (
    "gate_lora_A", "gate_lora_B", "up_lora_A", "up_lora_B", "down_lora_A", "down_lora_B",
    "fc1_lora_A", "fc1_lora_B", "fc2_lora_A", "fc2_lora_B", "router_weight", "router_bias",
)
FLOAT_NAMES = ("text_norm_eps", "visual_norm_eps", "lora_scale")
NUM_EXPERTS = 2  # index 0: visual expert (S_1), index 1: text expert (S_2), as in MKS2
# Residuals the forward returns after the output, for a fused backward:
# gate_pre (M, I), up_pre (M, I), visual_pre (M, Iv): pre-activations (wide);
# text_lowrank (M, 2r) = [x_t A_gate^T, x_t A_up^T], visual_lowrank (M, r) = x_v A_fc1^T,
# down_lowrank (M, r), fc2_lowrank (M, r): the LoRA-A outputs of the second layers;
# router_probs (M, 2) fp32, rstd (M, 2) fp32: 1/rms of x for the text and visual norm.
RESIDUAL_NAMES = (
    "gate_pre", "up_pre", "visual_pre", "text_lowrank", "visual_lowrank",
    "down_lowrank", "fc2_lowrank", "router_probs", "rstd",
)

mome_backends = OpDispatcher(OP, auto_order={"cuda": ("triton", "reference")})


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama RMSNorm: statistics in fp32, weight applied in x's dtype. x: (M, d) -> (M, d), rstd (M,)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd.squeeze(-1)


def _lora_linear(z, weight, lora_A, lora_B, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """MKS2 stage 2, "W0 x + B A x" (with PEFT's scale alpha/rank). z: (M, k) -> (M, n), lowrank (M, r)."""
    lowrank = z @ lora_A.T
    return z @ weight.T + scale * (lowrank @ lora_B.T), lowrank


@mome_backends.register("reference")
def mome_ffn_reference(
    x, text_norm_weight, gate_weight, up_weight, down_weight, visual_norm_weight, fc1_weight, fc2_weight,
    gate_lora_A, gate_lora_B, up_lora_A, up_lora_B, down_lora_A, down_lora_B,
    fc1_lora_A, fc1_lora_B, fc2_lora_A, fc2_lora_B, router_weight, router_bias,
    text_norm_eps, visual_norm_eps, lora_scale, return_residuals: bool = False,
):
    """The definition of the op, in plain torch (differentiable by autograd).

    x: (M, d); gate/up_weight: (I, d); down_weight: (d, I); fc1_weight: (Iv, d);
    fc2_weight: (d, Iv); *_lora_A: (r, in); *_lora_B: (out, r); router_weight: (2, d);
    router_bias: (2,); norm weights: (d,). Returns h_M (M, d), or
    (h_M, *residuals) in RESIDUAL_NAMES order when ``return_residuals``.
    """
    text_input, text_rstd = _rms_norm(x, text_norm_weight, text_norm_eps)
    visual_input, visual_rstd = _rms_norm(x, visual_norm_weight, visual_norm_eps)
    # Text expert: Llama SwiGLU MLP with LoRA on gate, up and down.
    gate_pre, gate_lowrank = _lora_linear(text_input, gate_weight, gate_lora_A, gate_lora_B, lora_scale)
    up_pre, up_lowrank = _lora_linear(text_input, up_weight, up_lora_A, up_lora_B, lora_scale)
    text_hidden = F.silu(gate_pre) * up_pre
    text_out, down_lowrank = _lora_linear(text_hidden, down_weight, down_lora_A, down_lora_B, lora_scale)
    # Visual expert: the MVM two-layer FFN with LoRA on fc1 and fc2.
    visual_pre, visual_lowrank = _lora_linear(visual_input, fc1_weight, fc1_lora_A, fc1_lora_B, lora_scale)
    visual_out, fc2_lowrank = _lora_linear(F.silu(visual_pre), fc2_weight, fc2_lora_A, fc2_lora_B, lora_scale)
    # MKS2 stage 2: S = softmax(W_s X + b_s); h_M = S_1 * h_VE + S_2 * h_TE.
    router_probs = torch.softmax((text_input @ router_weight.T + router_bias).float(), dim=-1)
    output = (router_probs[:, :1] * visual_out.float() + router_probs[:, 1:] * text_out.float()).to(x.dtype)
    if not return_residuals:
        return output
    return (
        output, gate_pre, up_pre, visual_pre, torch.cat([gate_lowrank, up_lowrank], dim=1), visual_lowrank,
        down_lowrank, fc2_lowrank, router_probs, torch.stack([text_rstd, visual_rstd], dim=1),
    )


def _reference_with_residuals(*args):
    return tuple(residual.contiguous() for residual in mome_ffn_reference(*args, return_residuals=True))


@mome_backends.register("triton", triton_unavailable_reason)
def _mome_ffn_triton(*args):
    # Imported on first use: Triton reads TRITON_INTERPRET when the kernels are decorated.
    from mkfast.kernels.mome import mome_forward

    return mome_forward(*args)


def _mome_ffn_triton_backward(*args):
    from mkfast.kernels.mome import mome_backward

    return mome_backward(*args)


# Backward of each backend that has its own (the reference uses autograd).
_backward_implementations = {"triton": _mome_ffn_triton_backward}


@torch.library.custom_op("mkfast::mome_ffn", mutates_args=())
def _mome_ffn_op(
    x: torch.Tensor, text_norm_weight: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
    down_weight: torch.Tensor, visual_norm_weight: torch.Tensor, fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor, gate_lora_A: torch.Tensor, gate_lora_B: torch.Tensor, up_lora_A: torch.Tensor,
    up_lora_B: torch.Tensor, down_lora_A: torch.Tensor, down_lora_B: torch.Tensor, fc1_lora_A: torch.Tensor,
    fc1_lora_B: torch.Tensor, fc2_lora_A: torch.Tensor, fc2_lora_B: torch.Tensor, router_weight: torch.Tensor,
    router_bias: torch.Tensor, text_norm_eps: float, visual_norm_eps: float, lora_scale: float,
) -> list[torch.Tensor]:
    args = locals()
    ordered = [args[name] for name in ("x", *FROZEN_NAMES, *TRAINABLE_NAMES, *FLOAT_NAMES)]
    backend = mome_backends.select(x.device)
    if backend.name == "reference":
        return list(_reference_with_residuals(*ordered))
    return list(backend.implementation(*ordered))


def _residual_shapes(x, gate_weight, fc1_weight, gate_lora_A):
    tokens, intermediate, visual_size, rank = x.shape[0], gate_weight.shape[0], fc1_weight.shape[0], gate_lora_A.shape[0]
    wide = [(tokens, intermediate), (tokens, intermediate), (tokens, visual_size)]
    low = [(tokens, 2 * rank), (tokens, rank), (tokens, rank), (tokens, rank)]
    return [(shape, x.dtype) for shape in [(tokens, x.shape[1])] + wide + low] + [
        ((tokens, NUM_EXPERTS), torch.float32), ((tokens, 2), torch.float32)]


@_mome_ffn_op.register_fake
def _(x, text_norm_weight, gate_weight, up_weight, down_weight, visual_norm_weight, fc1_weight, fc2_weight,
      gate_lora_A, *rest):
    return [x.new_empty(shape, dtype=dtype) for shape, dtype in _residual_shapes(x, gate_weight, fc1_weight, gate_lora_A)]


def _setup_context(ctx, inputs, output):
    # setup_context runs on the caller's thread, where use_backend() is visible;
    # backward may run on an autograd thread, so remember the backend by name.
    x = inputs[0]
    ctx.backend_name = mome_backends.select(x.device).name
    ctx.floats = inputs[-len(FLOAT_NAMES):]
    tensors = inputs[: -len(FLOAT_NAMES)]
    # The reference recomputes its forward in backward; fused backends read the residuals.
    ctx.save_for_backward(*tensors, *(output[1:] if ctx.backend_name in _backward_implementations else ()))


def _backward(ctx, output_grads):
    # The op returns a list (output, *residuals); only the output's gradient matters.
    grad_output = output_grads[0]
    num_tensors = 1 + len(FROZEN_NAMES) + len(TRAINABLE_NAMES)
    saved = ctx.saved_tensors
    tensors, residuals = saved[:num_tensors], saved[num_tensors:]
    first_trainable = 1 + len(FROZEN_NAMES)
    if ctx.backend_name in _backward_implementations:
        grads = torch.ops.mkfast.mome_ffn_backward(grad_output.contiguous(), *tensors, *residuals, *ctx.floats)
    else:
        # Reference: autograd through the definition, for x and the trainable weights only.
        with torch.enable_grad():
            leaves = [tensor.detach() for tensor in tensors]
            wanted = [0, *range(first_trainable, num_tensors)]
            for index in wanted:
                leaves[index].requires_grad_(True)
            output = mome_ffn_reference(*leaves, *ctx.floats)
            grads = torch.autograd.grad(output, [leaves[index] for index in wanted], grad_output)
    grads = [grad if ctx.needs_input_grad[index] else None
             for index, grad in zip([0, *range(first_trainable, num_tensors)], grads)]
    return (grads[0], *([None] * len(FROZEN_NAMES)), *grads[1:], *([None] * len(FLOAT_NAMES)))


_mome_ffn_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mkfast::mome_ffn_backward", mutates_args=())
def _mome_ffn_backward_op(
    grad_output: torch.Tensor, x: torch.Tensor, text_norm_weight: torch.Tensor, gate_weight: torch.Tensor,
    up_weight: torch.Tensor, down_weight: torch.Tensor, visual_norm_weight: torch.Tensor, fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor, gate_lora_A: torch.Tensor, gate_lora_B: torch.Tensor, up_lora_A: torch.Tensor,
    up_lora_B: torch.Tensor, down_lora_A: torch.Tensor, down_lora_B: torch.Tensor, fc1_lora_A: torch.Tensor,
    fc1_lora_B: torch.Tensor, fc2_lora_A: torch.Tensor, fc2_lora_B: torch.Tensor, router_weight: torch.Tensor,
    router_bias: torch.Tensor, gate_pre: torch.Tensor, up_pre: torch.Tensor, visual_pre: torch.Tensor,
    text_lowrank: torch.Tensor, visual_lowrank: torch.Tensor, down_lowrank: torch.Tensor,
    fc2_lowrank: torch.Tensor, router_probs: torch.Tensor, rstd: torch.Tensor, text_norm_eps: float,
    visual_norm_eps: float, lora_scale: float,
) -> list[torch.Tensor]:
    """Gradients of x and of the twelve trainable tensors, by the fused backend that ran forward."""
    # Only backends with a fused backward save residuals; today that is "triton".
    implementation = _backward_implementations["triton"]
    args = locals()
    return list(implementation(*[args[name] for name in (
        "grad_output", "x", *FROZEN_NAMES, *TRAINABLE_NAMES, *RESIDUAL_NAMES, *FLOAT_NAMES)]))


@_mome_ffn_backward_op.register_fake
def _(grad_output, x, *rest):
    trainable = rest[len(FROZEN_NAMES): len(FROZEN_NAMES) + len(TRAINABLE_NAMES)]
    return [torch.empty_like(x)] + [torch.empty_like(tensor) for tensor in trainable]


def _validate(x: torch.Tensor, weights: dict[str, torch.Tensor], lora_scale: float) -> None:
    check_tensor(OP, "x", x, ndim=2, layout="(M, d)", dtypes=FLOAT_DTYPES)
    intermediate, hidden = check_tensor(OP, "gate_weight", weights["gate_weight"], ndim=2, layout="(I, d)").shape
    check_same_size(OP, "last dim (d) like gate_weight's in_features", hidden, "x", x.shape[1])
    visual_size = check_tensor(OP, "fc1_weight", weights["fc1_weight"], ndim=2, layout="(Iv, d)").shape[0]
    rank = check_tensor(OP, "gate_lora_A", weights["gate_lora_A"], ndim=2, layout="(r, d)").shape[0]
    expected = {
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
    for name, shape in expected.items():
        tensor = check_tensor(OP, name, weights[name], ndim=len(shape), device=x.device)
        if tensor.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{OP}: {name} must have shape {shape} (d={hidden}, I={intermediate}, "
                             f"Iv={visual_size}, r={rank}), got {tuple(tensor.shape)}")
    if torch.is_grad_enabled():
        for name in FROZEN_NAMES:
            if weights[name].requires_grad:
                raise ValueError(f"{OP}: {name} is frozen (MKS2 trains only LoRA and the router) and gets no "
                                 f"gradient; call requires_grad_(False) on it, got requires_grad=True")
    if not isinstance(lora_scale, (int, float)):
        raise TypeError(f"{OP}: lora_scale must be a float, got {type(lora_scale).__name__}")


def mome_ffn(
    x: torch.Tensor, *, text_norm_weight, gate_weight, up_weight, down_weight, visual_norm_weight,
    fc1_weight, fc2_weight, gate_lora_A, gate_lora_B, up_lora_A, up_lora_B, down_lora_A, down_lora_B,
    fc1_lora_A, fc1_lora_B, fc2_lora_A, fc2_lora_B, router_weight, router_bias,
    lora_scale: float, text_norm_eps: float = 1e-5, visual_norm_eps: float = 1e-5,
) -> torch.Tensor:
    """h_M = S_1 * LoRA-MVM(x) + S_2 * LoRA-SwiGLU(x), without the residual (see the module docstring).

    Args:
        x: (..., d) fp32/fp16/bf16, h_s after self-attention; every weight has x's dtype and device.
        text_norm_weight, visual_norm_weight: (d,) the block's post-attention RMSNorm and the MVM's own.
        gate_weight, up_weight: (I, d); down_weight: (d, I); fc1_weight: (Iv, d); fc2_weight: (d, Iv).
        <projection>_lora_A: (r, in_features); <projection>_lora_B: (out_features, r).
        router_weight: (2, d), router_bias: (2,): expert 0 is visual, 1 is text.
        lora_scale: alpha / r (PEFT convention).
        text_norm_eps, visual_norm_eps: the two RMSNorms' epsilons (default: Llama-2's 1e-5).

    Returns:
        h_M: (..., d) in x's dtype.
    """
    weights = dict(
        text_norm_weight=text_norm_weight, gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight,
        visual_norm_weight=visual_norm_weight, fc1_weight=fc1_weight, fc2_weight=fc2_weight,
        gate_lora_A=gate_lora_A, gate_lora_B=gate_lora_B, up_lora_A=up_lora_A, up_lora_B=up_lora_B,
        down_lora_A=down_lora_A, down_lora_B=down_lora_B, fc1_lora_A=fc1_lora_A, fc1_lora_B=fc1_lora_B,
        fc2_lora_A=fc2_lora_A, fc2_lora_B=fc2_lora_B, router_weight=router_weight, router_bias=router_bias,
    )
    check_tensor(OP, "x", x, ndim=tuple(range(1, 9)), layout="(..., d)", dtypes=FLOAT_DTYPES)
    leading = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    _validate(tokens, weights, lora_scale)
    outputs = _mome_ffn_op(
        tokens.contiguous(), *[weights[name].contiguous() for name in (*FROZEN_NAMES, *TRAINABLE_NAMES)],
        float(text_norm_eps), float(visual_norm_eps), float(lora_scale),
    )
    return outputs[0].reshape(*leading, x.shape[-1])
