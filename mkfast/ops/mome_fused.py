"""The fused backends of mome_ffn: the cpu forward, and the analytic backward both fused backends share.

Notation of mkfast/ops/mome.py (x_t, x_v the normalised inputs, a_t = silu(gate) * up and
a_v = silu(fc1) the experts' activations, S the router probabilities, s the LoRA scale,
g the output's gradient). Backward, per expert with second layer (W_out, A_out, B_out):

  u      = g W_out + s (g B_out) A_out      gradient of the activation, before S
  dS     = sum_n u_n a_n                    (the expert's output dotted with g)
  d(pre) = S u act'(pre)                    (dgate, dup for the text expert; dfc1)
  dA_out = s (S g B_out)^T a,   dB_out = s g^T ((S a) A_out^T)

then the first layers and the router give d(x_t), d(x_v), and each RMSNorm's backward
dx = rstd w.d(x_n) - x rstd^3 / d * sum(x w.d(x_n)). A backend supplies the two wide
steps (expert_grad_hidden, grad_input); the rank-r products between them run here as
torch matmuls on the (M, r) side, scaling the (M, r) operand instead of a wide one.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mkfast.ops.mome import TEXT, VISUAL, MoMEResiduals, MoMEWeights, rms_norm


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


def _cpu_expert_grad_hidden(grad_output, out_weight, lora_A, grad_lowrank, first, second, probs, column,
                            scale):
    """(dS (M,) fp32, d(first), d(second) or None, dA_out (r, width)); the math in the module docstring."""
    grad_act = (grad_output @ out_weight).addmm_(grad_lowrank, lora_A, alpha=scale)
    silu = F.silu(first)
    activation = silu * second if second is not None else silu
    score_grad = torch.linalg.vecdot(grad_act, activation).float()
    prob = probs[:, column:column + 1]
    grad_act.mul_(prob)
    second_grad = None
    if second is not None:
        second_grad = grad_act * silu
        grad_act.mul_(second)
    # ATen's silu_backward: grad * silu'(first) in one pass over the wide tensor.
    first_grad = torch.ops.aten.silu_backward(grad_act, first)
    lora_A_grad = scale * ((grad_lowrank * prob).to(first.dtype).T @ activation)
    return score_grad, first_grad, second_grad, lora_A_grad


def _cpu_grad_input(x, gate_grad, up_grad, visual_grad, gate_grad_lowrank, up_grad_lowrank, fc1_grad_lowrank,
                    logits_grad, weights, rstd):
    """(rstd_t g_t + rstd_v g_v (M, d) fp32, [sum x g_t, sum x g_v] (M, 2) fp32), g_n = w_n d(x_n)."""
    w, scale = weights, weights.lora_scale
    text = (gate_grad @ w.gate_weight).addmm_(up_grad, w.up_weight)
    text_lowrank_grad = torch.cat([gate_grad_lowrank, up_grad_lowrank], dim=1)
    text.addmm_(text_lowrank_grad, torch.cat([w.gate_lora_A, w.up_lora_A]), alpha=scale)
    text.addmm_(logits_grad.to(x.dtype), w.router_weight)
    visual = (visual_grad @ w.fc1_weight).addmm_(fc1_grad_lowrank, w.fc1_lora_A, alpha=scale)
    text_grad = text.float().mul_(w.text_norm_weight.float())
    visual_grad_input = visual.float().mul_(w.visual_norm_weight.float())
    x32 = x.float()
    row_sums = torch.stack([torch.linalg.vecdot(x32, text_grad), torch.linalg.vecdot(x32, visual_grad_input)],
                           dim=1)
    scaled = text_grad.mul_(rstd[:, 0:1]).add_(visual_grad_input.mul_(rstd[:, 1:2]))
    return scaled, row_sums


def _triton_parts():
    from mkfast.kernels import mome

    return SimpleNamespace(expert_grad_hidden=mome.expert_grad_hidden, grad_input=mome.grad_input)


def _cpu_parts():
    return SimpleNamespace(expert_grad_hidden=_cpu_expert_grad_hidden, grad_input=_cpu_grad_input)


_PARTS = {"cpu": _cpu_parts, "triton": _triton_parts}


# --------------------------------------------------------------------------- shared backward
def fused_backward(backend: str, grad_output: torch.Tensor, x: torch.Tensor, weights: MoMEWeights,
                   residuals: MoMEResiduals) -> list[torch.Tensor]:
    """[dx, *gradients of MoMEWeights.trainable()], in x's dtype."""
    if x.shape[0] == 0:
        return [torch.zeros_like(x)] + [torch.zeros_like(tensor) for tensor in weights.trainable()]
    parts = _PARTS[backend]()
    w, res, scale, dtype = weights, residuals, weights.lora_scale, x.dtype
    rank, hidden = w.gate_lora_A.shape[0], x.shape[1]
    probs, rstd = res.router_probs, res.rstd
    text_score_grad, gate_grad, up_grad, down_lora_A_grad = parts.expert_grad_hidden(
        grad_output, w.down_weight, w.down_lora_A, grad_output @ w.down_lora_B, res.gate_pre, res.up_pre,
        probs, TEXT, scale)
    visual_score_grad, visual_grad, _, fc2_lora_A_grad = parts.expert_grad_hidden(
        grad_output, w.fc2_weight, w.fc2_lora_A, grad_output @ w.fc2_lora_B, res.visual_pre, None, probs,
        VISUAL, scale)
    # Softmax over two experts: dlogit_visual = p_v p_t (dS_v - dS_t) = -dlogit_text.
    logit_grad_visual = probs[:, VISUAL] * probs[:, TEXT] * (visual_score_grad - text_score_grad)
    logits_grad = torch.stack([logit_grad_visual, -logit_grad_visual], dim=1).contiguous()
    gate_grad_lowrank, up_grad_lowrank = gate_grad @ w.gate_lora_B, up_grad @ w.up_lora_B
    fc1_grad_lowrank = visual_grad @ w.fc1_lora_B
    scaled_grad, row_sums = parts.grad_input(x, gate_grad, up_grad, visual_grad, gate_grad_lowrank,
                                             up_grad_lowrank, fc1_grad_lowrank, logits_grad, w, rstd)
    # RMSNorm backward, the row-wide half: dx = rstd w.g - x rstd^3 / d * sum(x w.g), per norm.
    row_terms = (rstd.pow(3) * row_sums).sum(dim=1, keepdim=True)
    x_grad = scaled_grad.addcmul_(x.float(), row_terms, value=-1.0 / hidden)

    def times_normalized_input(row_grads, column, norm_weight):
        """row_grads^T @ norm(x): (k, d) from row_grads (M, k), scaling the (M, k) side by rstd."""
        scaled_rows = (row_grads.float() * rstd[:, column:column + 1]).to(dtype)
        return (scaled_rows.T @ x).float() * norm_weight.float()

    text_lowrank = res.text_lowrank
    grads = (
        x_grad,
        scale * times_normalized_input(gate_grad_lowrank, 0, w.text_norm_weight),
        scale * (gate_grad.T @ text_lowrank[:, :rank]),
        scale * times_normalized_input(up_grad_lowrank, 0, w.text_norm_weight),
        scale * (up_grad.T @ text_lowrank[:, rank:]),
        down_lora_A_grad,
        # The second layers' LoRA-A outputs were saved router-weighted: dB = s g^T (S a) A^T.
        scale * (grad_output.T @ res.down_lowrank),
        scale * times_normalized_input(fc1_grad_lowrank, 1, w.visual_norm_weight),
        scale * (visual_grad.T @ res.visual_lowrank),
        fc2_lora_A_grad,
        scale * (grad_output.T @ res.fc2_lowrank),
        times_normalized_input(logits_grad, 0, w.text_norm_weight),
        logits_grad.sum(dim=0),
    )
    return [grad.to(dtype) for grad in grads]
