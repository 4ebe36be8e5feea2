"""The fused backends of mome_ffn: the cpu forward, and the analytic backward both fused backends share.

Notation of mkfast/ops/mome.py (x_t, x_v the normalised inputs, a_t = silu(gate) * up and
a_v = silu(fc1) the experts' activations, S the router probabilities, s the LoRA scale,
g the output's gradient). Backward, per expert with second layer (W_out, A_out, B_out):

  u      = g W_out + s (g B_out) A_out      gradient of the activation, before S
  dS     = sum_n u_n a_n                    (the expert's output dotted with g)
  d(pre) = S u act'(pre)                    (dgate, dup for the text expert; dfc1)
  dA_out = s (S g B_out)^T a,   dB_out = s g^T ((S a) A_out^T)

then the first layers and the router give d(x_t), d(x_v), and each RMSNorm's backward
dx = rstd w.d(x_n) - x rstd^3 / d * sum(x w.d(x_n)). A backend supplies three steps, each
doing the rank-r products of the wide tensors it reads, so none is read again for them:
out_lowrank_grads (g B_out and dB_out, from g), grad_hidden (both experts, with the
rank-r products of d(pre) from the tiles it holds) and grad_input (with the RMSNorm
backward and the LoRA-A / router products of x). Only (M, r)-sized work runs here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mkfast.ops.mome_weights import TEXT, VISUAL, MoMEResiduals, MoMEWeights, rms_norm


# --------------------------------------------------------------------------- cpu backend
# What it saves is MoMEResiduals (2 I + Iv + 5 r values per token in x's dtype, 4 fp32),
# against about 4 I + 2 Iv + 4 d for a PEFT-style composition under autograd; backward
# recomputes the activations from the pre-activations instead of storing them.
def cpu_forward(x: torch.Tensor, weights: MoMEWeights) -> tuple[torch.Tensor, MoMEResiduals]:
    """The op with torch matmuls, every LoRA-B product added into its GEMM's output in place."""
    w, scale, rank = weights, weights.lora_scale, weights.gate_lora_A.shape[0]
    text_input, text_rstd = rms_norm(x, w.text_norm_weight, w.text_norm_eps)
    visual_input, visual_rstd = rms_norm(x, w.visual_norm_weight, w.visual_norm_eps)
    # One skinny product gives both LoRA-A outputs of the text expert and the router's logits.
    text_skinny = text_input @ torch.cat([w.gate_lora_A, w.up_lora_A, w.router_weight]).T
    text_lowrank = text_skinny[:, :2 * rank].contiguous()
    probs = torch.softmax((text_skinny[:, 2 * rank:] + w.router_bias).float(), dim=-1)
    visual_lowrank = visual_input @ w.fc1_lora_A.T
    gate_pre = (text_input @ w.gate_weight.T).addmm_(text_lowrank[:, :rank], w.gate_lora_B.T, alpha=scale)
    up_pre = (text_input @ w.up_weight.T).addmm_(text_lowrank[:, rank:], w.up_lora_B.T, alpha=scale)
    visual_pre = (visual_input @ w.fc1_weight.T).addmm_(visual_lowrank, w.fc1_lora_B.T, alpha=scale)
    # Activations scaled by their router weight, so both experts' second layers add into one output.
    text_act = F.silu(gate_pre).mul_(up_pre).mul_(probs[:, TEXT:TEXT + 1])
    visual_act = F.silu(visual_pre).mul_(probs[:, VISUAL:VISUAL + 1])
    down_lowrank, fc2_lowrank = text_act @ w.down_lora_A.T, visual_act @ w.fc2_lora_A.T
    output = (text_act @ w.down_weight.T).addmm_(visual_act, w.fc2_weight.T)
    second_lora_B = torch.cat([w.down_lora_B, w.fc2_lora_B], dim=1)
    output.addmm_(torch.cat([down_lowrank, fc2_lowrank], dim=1), second_lora_B.T, alpha=scale)
    rstd = torch.stack([text_rstd, visual_rstd], dim=1)
    return output, MoMEResiduals(gate_pre, up_pre, visual_pre, text_lowrank, visual_lowrank, down_lowrank,
                                 fc2_lowrank, probs, rstd)


class ExpertGrads(NamedTuple):
    """What a backend's grad_hidden returns for each expert (second_* None when ungated).

    score_grad (M,) fp32 = dS; first_grad, second_grad (M, width) = d(pre) in x's dtype;
    lora_A_grad (r, width) = dA_out; first_lowrank_grad, second_lowrank_grad (M, r) = d(pre) B;
    first_lora_B_grad, second_lora_B_grad (width, r) = s d(pre)^T (z A^T) of the first layers.
    """

    score_grad: torch.Tensor
    first_grad: torch.Tensor
    second_grad: torch.Tensor | None
    lora_A_grad: torch.Tensor
    first_lowrank_grad: torch.Tensor
    second_lowrank_grad: torch.Tensor | None
    first_lora_B_grad: torch.Tensor
    second_lora_B_grad: torch.Tensor | None


def _cpu_expert_grad_hidden(grad_output, out_weight, lora_A, grad_lowrank, first, second, probs,
                            column, scale):
    """ExpertGrads with torch ops; first/second: (pre-activation, LoRA-A output, LoRA B) of a first layer."""
    first_pre, first_lowrank, first_lora_B = first
    grad_act = (grad_output @ out_weight).addmm_(grad_lowrank, lora_A, alpha=scale)
    silu = F.silu(first_pre)
    activation = silu * second[0] if second is not None else silu
    score_grad = torch.linalg.vecdot(grad_act, activation).float()
    prob = probs[:, column:column + 1]
    grad_act.mul_(prob)
    second_grads = (None, None, None)
    if second is not None:
        second_pre, second_lowrank, second_lora_B = second
        second_grad = grad_act * silu
        second_grads = (second_grad, second_grad @ second_lora_B, scale * (second_grad.T @ second_lowrank))
        grad_act.mul_(second_pre)
    # ATen's silu_backward: grad * silu'(first) in one pass over the wide tensor.
    first_grad = torch.ops.aten.silu_backward(grad_act, first_pre)
    lora_A_grad = scale * ((grad_lowrank * prob).to(first_pre.dtype).T @ activation)
    return ExpertGrads(score_grad, first_grad, second_grads[0], lora_A_grad, first_grad @ first_lora_B,
                       second_grads[1], scale * (first_grad.T @ first_lowrank), second_grads[2])


def _cpu_out_lowrank_grads(grad_output, weights, residuals):
    """(g [B_d, B_2], s g^T [l_d, l_2]): one product each."""
    w, res = weights, residuals
    grad_lowrank = grad_output @ torch.cat([w.down_lora_B, w.fc2_lora_B], dim=1)
    # The second layers' LoRA-A outputs were saved router-weighted: dB = s g^T (S a) A^T.
    lora_B_grad = w.lora_scale * (grad_output.T @ torch.cat([res.down_lowrank, res.fc2_lowrank], dim=1))
    return grad_lowrank, lora_B_grad


def _cpu_grad_hidden(grad_output, grad_lowrank, weights, residuals):
    """(text, visual) ExpertGrads fields, one expert at a time."""
    w, res, rank = weights, residuals, weights.gate_lora_A.shape[0]
    text_lowrank = res.text_lowrank
    text = _cpu_expert_grad_hidden(
        grad_output, w.down_weight, w.down_lora_A, grad_lowrank[:, :rank],
        (res.gate_pre, text_lowrank[:, :rank], w.gate_lora_B),
        (res.up_pre, text_lowrank[:, rank:], w.up_lora_B),
        res.router_probs, TEXT, w.lora_scale)
    visual = _cpu_expert_grad_hidden(
        grad_output, w.fc2_weight, w.fc2_lora_A, grad_lowrank[:, rank:],
        (res.visual_pre, res.visual_lowrank, w.fc1_lora_B), None, res.router_probs, VISUAL, w.lora_scale)
    return text, visual


def _cpu_grad_input(x, gate_grad, up_grad, visual_grad, text_lowrank_grad, fc1_lowrank_grad, logits_grad,
                    weights, rstd, lowrank_rows):
    """(d(x) in x's dtype: both normalised inputs' gradients, then both RMSNorms' backward;
    lowrank_rows^T x fp32)."""
    w, scale, dtype = weights, weights.lora_scale, x.dtype
    text = (gate_grad @ w.gate_weight).addmm_(up_grad, w.up_weight)
    text.addmm_(text_lowrank_grad.to(dtype), torch.cat([w.gate_lora_A, w.up_lora_A]), alpha=scale)
    text.addmm_(logits_grad.to(dtype), w.router_weight)
    visual = (visual_grad @ w.fc1_weight).addmm_(fc1_lowrank_grad.to(dtype), w.fc1_lora_A, alpha=scale)
    text_grad = text.float().mul_(w.text_norm_weight.float())
    visual_grad_input = visual.float().mul_(w.visual_norm_weight.float())
    x32 = x.float()
    row_sums = torch.stack([torch.linalg.vecdot(x32, text_grad), torch.linalg.vecdot(x32, visual_grad_input)],
                           dim=1)
    # RMSNorm backward per norm: dx = rstd w.g - x rstd^3 / d * sum(x w.g).
    row_terms = (rstd.pow(3) * row_sums).sum(dim=1, keepdim=True)
    x_grad = text_grad.mul_(rstd[:, 0:1]).add_(visual_grad_input.mul_(rstd[:, 1:2]))
    x_grad = x_grad.addcmul_(x32, row_terms, value=-1.0 / x.shape[1]).to(dtype)
    return x_grad, (lowrank_rows.to(dtype).T @ x).float()


def _cpu_parts():
    return SimpleNamespace(out_lowrank_grads=_cpu_out_lowrank_grads, grad_hidden=_cpu_grad_hidden,
                           grad_input=_cpu_grad_input)


def _triton_parts():
    from mkfast.kernels import mome

    return SimpleNamespace(out_lowrank_grads=mome.out_lowrank_grads, grad_hidden=mome.grad_hidden,
                           grad_input=mome.grad_input)


_PARTS = {"cpu": _cpu_parts, "triton": _triton_parts}


# --------------------------------------------------------------------------- shared backward
def fused_backward(backend: str, grad_output: torch.Tensor, x: torch.Tensor, weights: MoMEWeights,
                   residuals: MoMEResiduals) -> list[torch.Tensor]:
    """[dx, *gradients of MoMEWeights.trainable()], in x's dtype."""
    if x.shape[0] == 0:
        return [torch.zeros_like(x)] + [torch.zeros_like(tensor) for tensor in weights.trainable()]
    parts = _PARTS[backend]()
    w, res, scale, dtype = weights, residuals, weights.lora_scale, x.dtype
    rank = w.gate_lora_A.shape[0]
    probs, rstd = res.router_probs, res.rstd
    out_grad_lowrank, out_lora_B_grads = parts.out_lowrank_grads(grad_output, w, res)
    text, visual = (ExpertGrads(*grads) for grads in parts.grad_hidden(grad_output, out_grad_lowrank, w, res))
    # Softmax over two experts: dlogit_visual = p_v p_t (dS_v - dS_t) = -dlogit_text.
    logit_grad_visual = probs[:, VISUAL] * probs[:, TEXT] * (visual.score_grad - text.score_grad)
    logits_grad = torch.stack([logit_grad_visual, -logit_grad_visual], dim=1).contiguous()
    text_lowrank_grad = torch.cat([text.first_lowrank_grad, text.second_lowrank_grad], dim=1)
    # G^T x_n = ((rstd_n G)^T x) * w_n: the (M, k) sides are scaled by their norm's rstd and
    # stacked, so one product, on grad_input's read of x, gives the LoRA-A gradients of gate, up,
    # fc1 and the router's.
    text_rows = torch.cat([scale * text_lowrank_grad, logits_grad], dim=1) * rstd[:, 0:1]
    visual_rows = scale * visual.first_lowrank_grad.float() * rstd[:, 1:2]
    lowrank_rows = torch.cat([text_rows, visual_rows], dim=1).to(dtype)
    x_grad, products = parts.grad_input(x, text.first_grad, text.second_grad, visual.first_grad,
                                        text_lowrank_grad, visual.first_lowrank_grad, logits_grad, w, rstd,
                                        lowrank_rows)
    text_products = products[:2 * rank + 2] * w.text_norm_weight.float()
    fc1_lora_A_grad = products[2 * rank + 2:] * w.visual_norm_weight.float()
    def part(tensor):  # a slice of a shared product, copied: outputs of a custom op may not alias
        return tensor.to(dtype, copy=True)

    grads = (
        x_grad,
        part(text_products[:rank]), text.first_lora_B_grad,
        part(text_products[rank:2 * rank]), text.second_lora_B_grad,
        text.lora_A_grad, part(out_lora_B_grads[:, :rank]),
        fc1_lora_A_grad, visual.first_lora_B_grad,
        visual.lora_A_grad, part(out_lora_B_grads[:, rank:]),
        part(text_products[2 * rank:]), logits_grad.sum(dim=0),
    )
    return [grad.to(dtype) for grad in grads]
