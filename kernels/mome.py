"""Triton kernels of mome_ffn (MKS2 stage 2's soft mixture of a LoRA-SwiGLU and a LoRA-MVM).

The op's math and names are defined in mkfast/ops/mome.py. Here, per token block:

forward
  _mome_lowrank_in_kernel     one pass over x: both RMSNorm statistics, the LoRA-A
                              outputs of gate/up/fc1 and the router logits + softmax
  _mome_expert_in_kernel      gate|up (or fc1) GEMM over x*norm_weight, rstd applied in
                              the epilogue, LoRA as an extra K-slice (lowrank @ B^T),
                              SwiGLU (or SiLU) in the epilogue
  _mome_act_lowrank_kernel    LoRA-A of down / fc2: activation @ A^T
  _mome_expert_out_kernel     down and fc2 GEMMs into two accumulators, LoRA K-slices,
                              router mix in the epilogue
backward
  _mome_expert_grad_hidden_kernel  u = g W_out + s (g B_out) A_out; epilogue: dS partial
                              row sums u.a, dgate/dup (or dfc1) and the LoRA-A gradient
                              of the out projection (atomic over token blocks)
  _mome_grad_input_kernel     d(x_t) and d(x_v) from both experts and the router in one
                              output tile, with the per-row sums the RMSNorm backward needs
The skinny (rank-r) products between launches run as torch matmuls: they read
(M, d) or (M, I) once and cost a few percent of the frozen GEMMs.

Stored for backward: gate/up/fc1 pre-activations (not silu, not the product, not
the LoRA intermediates of the wide layers): 2*I + Iv values per token, against
about 4*I + 2*Iv for a PEFT composition under autograd. The activations (I + Iv per
token) are written once in forward for the second layer and freed when it returns:
recomputing SwiGLU in the down GEMM's prologue instead would redo it once per
output-column tile (d / BLOCK_N = 32 times at Llama-2-7B sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mkfast.backend import triton_interpreter_enabled

# Tile sizes. No GPU was available when this was written, so nothing here is a
# measurement: the wide GEMM kernels autotune over GEMM_TILES (BLOCK_M, BLOCK_N,
# BLOCK_K, warps, stages), the Triton matmul tutorial's fp16 configurations cut to
# those whose two fp32 accumulators fit in registers; the kernel with atomics and
# the rank-r kernels use FIXED_TILE (64x128x64, 4 warps, 3 stages). The interpreter
# runs 32-wide tiles: fewer, larger numpy ops are faster there, and tl.dot needs
# every dimension >= 16. Checked without a GPU by compiling every kernel and tile for
# sm_90 with Triton + ptxas (bf16/fp16/fp32, and with tokens = rank = 1 specialised): all
# compile; in fp32 the 128x128x64 grad-input tile needs 256 KiB of shared memory, more
# than an H100 has, and the autotuner skips it (OutOfResources).
GEMM_TILES = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4))
if triton_interpreter_enabled():
    GEMM_TILES = ((32, 32, 32, 4, 1),)
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = (32, 32, 32, 4, 1) if triton_interpreter_enabled() else (64, 128, 64, 4, 3)
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
                for m, n, k, warps, stages in GEMM_TILES]
SMALLEST_GEMM_BLOCK_N = min(tile[1] for tile in GEMM_TILES)
GROUP_M = 8  # row blocks per group in the tile order (Triton matmul tutorial's value)
MIN_DOT_SIZE = 16  # smallest tl.dot dimension; LoRA ranks are padded up to it
# Columns of rstd (text norm, visual norm) and of the router probabilities (visual, text expert).
RSTD_TEXT, RSTD_VISUAL = 0, 1
PROB_VISUAL, PROB_TEXT = 0, 1


def _padded(size: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(size))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dots so fp32 results match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _tile_coordinates(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program in a 1-D grid, GROUP_M row blocks at a time.

    Consecutive programs sweep GROUP_M token blocks for each weight tile, so a wave of programs
    reuses both its x tiles and its weight tiles from L2 (the Triton matmul tutorial's order);
    row-major order would re-read all of x from memory once per column block.
    """
    program = tl.program_id(0)
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    programs_per_group = GROUP_M * tl.cdiv(num_cols, BLOCK_N)
    first_row_block = (program // programs_per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (program % programs_per_group) % group_rows
    col_block = (program % programs_per_group) // group_rows
    return row_block, col_block


@triton.jit
def _silu_and_grad(pre):
    sigmoid = 1.0 / (1.0 + tl.exp(-pre))
    return pre * sigmoid, sigmoid * (1.0 + pre * (1.0 - sigmoid))


@triton.jit
def _mome_lowrank_in_kernel(
    x_ptr, text_norm_ptr, visual_norm_ptr, text_proj_ptr, visual_proj_ptr, router_bias_ptr,
    text_lowrank_ptr, visual_lowrank_ptr, probs_ptr, rstd_ptr,
    tokens, hidden, rank, text_eps, visual_eps,
    TEXT_COLUMNS: tl.constexpr, VISUAL_COLUMNS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """text_proj: (2r+2, d) = [gate_A; up_A; router_W]; visual_proj: (r, d) = fc1_A.

    Writes text_lowrank (M, 2r), visual_lowrank (M, r), probs (M, 2) fp32, rstd (M, 2) fp32.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tokens
    text_cols = tl.arange(0, TEXT_COLUMNS)
    visual_cols = tl.arange(0, VISUAL_COLUMNS)
    sum_squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    text_acc = tl.zeros((BLOCK_M, TEXT_COLUMNS), dtype=tl.float32)
    visual_acc = tl.zeros((BLOCK_M, VISUAL_COLUMNS), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        x = tl.load(x_ptr + rows[:, None] * hidden + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        x32 = x.to(tl.float32)
        sum_squares += tl.sum(x32 * x32, axis=1)
        # The norms' rstd is per row, so it moves to the epilogue: norm(x) W^T = rstd * (x*w) W^T.
        text_norm = tl.load(text_norm_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        visual_norm = tl.load(visual_norm_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        text_proj = tl.load(text_proj_ptr + text_cols[None, :] * hidden + ks[:, None],
                            mask=(text_cols[None, :] < 2 * rank + 2) & k_mask[:, None], other=0.0)
        visual_proj = tl.load(visual_proj_ptr + visual_cols[None, :] * hidden + ks[:, None],
                              mask=(visual_cols[None, :] < rank) & k_mask[:, None], other=0.0)
        text_acc += tl.dot((x32 * text_norm[None, :]).to(x.dtype), text_proj, input_precision=PRECISION)
        visual_acc += tl.dot((x32 * visual_norm[None, :]).to(x.dtype), visual_proj, input_precision=PRECISION)
    text_rstd = 1.0 / tl.sqrt(sum_squares / hidden + text_eps)
    visual_rstd = 1.0 / tl.sqrt(sum_squares / hidden + visual_eps)
    text_acc = text_acc * text_rstd[:, None]
    visual_acc = visual_acc * visual_rstd[:, None]
    out_dtype = text_lowrank_ptr.dtype.element_ty
    tl.store(text_lowrank_ptr + rows[:, None] * (2 * rank) + text_cols[None, :], text_acc.to(out_dtype),
             mask=row_mask[:, None] & (text_cols[None, :] < 2 * rank))
    tl.store(visual_lowrank_ptr + rows[:, None] * rank + visual_cols[None, :], visual_acc.to(out_dtype),
             mask=row_mask[:, None] & (visual_cols[None, :] < rank))
    # Router epilogue: the two logits are columns 2r and 2r+1; softmax of two = a sigmoid.
    logit_visual = tl.sum(tl.where(text_cols[None, :] == 2 * rank, text_acc, 0.0), axis=1) + tl.load(router_bias_ptr).to(tl.float32)
    logit_text = tl.sum(tl.where(text_cols[None, :] == 2 * rank + 1, text_acc, 0.0), axis=1) + tl.load(router_bias_ptr + 1).to(tl.float32)
    prob_visual = 1.0 / (1.0 + tl.exp(logit_text - logit_visual))
    tl.store(probs_ptr + rows * 2, prob_visual, mask=row_mask)
    tl.store(probs_ptr + rows * 2 + 1, 1.0 - prob_visual, mask=row_mask)
    tl.store(rstd_ptr + rows * 2, text_rstd, mask=row_mask)
    tl.store(rstd_ptr + rows * 2 + 1, visual_rstd, mask=row_mask)


# Tuned per (widths, power-of-two token count): training sees few distinct buckets.
@triton.autotune(configs=GEMM_CONFIGS, key=["hidden", "width", "tokens_bucket"])
@triton.jit
def _mome_expert_in_kernel(
    x_ptr, norm_ptr, first_weight_ptr, second_weight_ptr, lowrank_ptr, first_lora_B_ptr, second_lora_B_ptr,
    rstd_ptr, probs_ptr, first_out_ptr, second_out_ptr, activation_out_ptr,
    tokens, tokens_bucket, hidden, width, rank, lowrank_stride, rstd_column, prob_column, lora_scale,
    GATED: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """first_out = rstd * (x*w) W1^T + s * lowrank[:, :r] B1^T: (M, width); GATED also second (W2, lowrank[:, r:2r]).

    Epilogue: activation_out = S * silu(first) * second (GATED, SwiGLU) or S * silu(first), from
    the values as rounded for storage, S = probs[:, prob_column] the expert's router weight, so
    that both experts' second layers add into one accumulator. It feeds the second layer and is
    freed after forward (backward recomputes the activation from the pre-activations).
    """
    row_block, col_block = _tile_coordinates(tokens, width, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < tokens, cols < width
    first_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    second_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        x = tl.load(x_ptr + rows[:, None] * hidden + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        norm = tl.load(norm_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * norm[None, :]).to(x.dtype)
        weight_offsets = cols[None, :] * hidden + ks[:, None]  # W^T tile (BLOCK_K, BLOCK_N)
        weight_mask = col_mask[None, :] & k_mask[:, None]
        first_acc += tl.dot(x, tl.load(first_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), input_precision=PRECISION)
        if GATED:
            second_acc += tl.dot(x, tl.load(second_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), input_precision=PRECISION)
    rstd = tl.load(rstd_ptr + rows * 2 + rstd_column, mask=row_mask, other=0.0)
    # LoRA as one more K-slice of the same output tile: [x, x A^T] . [W0, s B]^T.
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    lowrank = tl.load(lowrank_ptr + rows[:, None] * lowrank_stride + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    lora_B_offsets = cols[None, :] * rank + ranks[:, None]  # B^T tile (RANK_PAD, BLOCK_N)
    lora_B_mask = col_mask[None, :] & rank_mask[:, None]
    first = first_acc * rstd[:, None] + lora_scale * tl.dot(lowrank, tl.load(first_lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0), input_precision=PRECISION)
    out_offsets = rows[:, None] * width + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    dtype = first_out_ptr.dtype.element_ty
    first = first.to(dtype)
    tl.store(first_out_ptr + out_offsets, first, mask=out_mask)
    first = first.to(tl.float32)
    activation = first / (1.0 + tl.exp(-first))
    if GATED:
        second_lowrank = tl.load(lowrank_ptr + rows[:, None] * lowrank_stride + rank + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        second = second_acc * rstd[:, None] + lora_scale * tl.dot(second_lowrank, tl.load(second_lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0), input_precision=PRECISION)
        second = second.to(dtype)
        tl.store(second_out_ptr + out_offsets, second, mask=out_mask)
        activation = activation * second.to(tl.float32)
    prob = tl.load(probs_ptr + rows * 2 + prob_column, mask=row_mask, other=0.0)
    tl.store(activation_out_ptr + out_offsets, (activation * prob[:, None]).to(dtype), mask=out_mask)


@triton.jit
def _mome_act_lowrank_kernel(
    activation_ptr, lora_A_ptr, out_ptr, tokens, width, rank,
    RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = activation @ A^T: (M, r); activation: (M, width), A: (r, width)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tokens
    ranks = tl.arange(0, RANK_PAD)
    acc = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    for start in range(0, width, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < width
        activation = tl.load(activation_ptr + rows[:, None] * width + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        lora_A = tl.load(lora_A_ptr + ranks[None, :] * width + ks[:, None], mask=(ranks[None, :] < rank) & k_mask[:, None], other=0.0)
        acc += tl.dot(activation, lora_A, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (ranks[None, :] < rank))


@triton.jit
def _accumulate_row_major(acc, act_ptr, weight_ptr, rows, cols, row_mask, col_mask, width,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += act[rows, :] @ weight[cols, :]^T over K = width; act: (M, width), weight: (N, width)."""
    for start in range(0, width, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < width
        act = tl.load(act_ptr + rows[:, None] * width + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                      other=0.0)
        weight = tl.load(weight_ptr + cols[None, :] * width + ks[:, None], mask=col_mask[None, :] & k_mask[:, None],
                         other=0.0)
        acc += tl.dot(act, weight, input_precision=PRECISION)
    return acc


@triton.autotune(configs=GEMM_CONFIGS, key=["hidden", "intermediate", "visual_size", "tokens_bucket"])
@triton.jit
def _mome_expert_out_kernel(
    text_act_ptr, visual_act_ptr, down_weight_ptr, fc2_weight_ptr, down_lowrank_ptr, fc2_lowrank_ptr,
    down_lora_B_ptr, fc2_lora_B_ptr, out_ptr,
    tokens, tokens_bucket, hidden, intermediate, visual_size, rank, lora_scale,
    RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = [S_2 a_t, S_1 a_v, s l_d, s l_2] . [W_d, W_2, B_d, B_2]^T: (M, d), one accumulator.

    The activations and LoRA-A outputs come router-weighted from expert_in, so the two experts
    are one GEMM over K = I + Iv + 2r: one fp32 (BLOCK_M, BLOCK_N) tile stays live, not two.
    """
    row_block, col_block = _tile_coordinates(tokens, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < tokens, cols < hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_row_major(acc, text_act_ptr, down_weight_ptr, rows, cols, row_mask, col_mask, intermediate,
                                BLOCK_K, PRECISION)
    acc = _accumulate_row_major(acc, visual_act_ptr, fc2_weight_ptr, rows, cols, row_mask, col_mask, visual_size,
                                BLOCK_K, PRECISION)
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    lowrank_offsets = rows[:, None] * rank + ranks[None, :]
    lowrank_mask = row_mask[:, None] & rank_mask[None, :]
    lora_B_offsets = cols[None, :] * rank + ranks[:, None]
    lora_B_mask = col_mask[None, :] & rank_mask[:, None]
    down_lowrank = tl.load(down_lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0)
    fc2_lowrank = tl.load(fc2_lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0)
    lora = tl.dot(down_lowrank, tl.load(down_lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0),
                  input_precision=PRECISION)
    lora = tl.dot(fc2_lowrank, tl.load(fc2_lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0), lora,
                  input_precision=PRECISION)
    acc += lora_scale * lora
    tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _mome_expert_grad_hidden_kernel(
    grad_ptr, out_weight_ptr, grad_lowrank_ptr, lora_A_ptr, first_ptr, second_ptr, probs_ptr,
    partial_ptr, first_grad_ptr, second_grad_ptr, lora_A_grad_ptr,
    tokens, hidden, width, rank, prob_column, num_col_blocks, lora_scale,
    GATED: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One expert's hidden-layer gradient. g: (M, d), out_weight: (d, width), grad_lowrank = g B_out: (M, r).

    u = g W_out + s (g B_out) A_out (the gradient of the expert's hidden activation a, before
    the router weight p). Writes partial[m, block] = sum_n u*a (for dS), d(pre) = p*u*act'(pre)
    and accumulates dA_out += s (p g B_out)^T a (fp32, atomically over token blocks).
    """
    row_block, col_block = _tile_coordinates(tokens, width, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < tokens, cols < width
    dtype = first_grad_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        grad = tl.load(grad_ptr + rows[:, None] * hidden + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        weight = tl.load(out_weight_ptr + ks[:, None] * width + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(grad, weight, input_precision=PRECISION)
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    grad_lowrank = tl.load(grad_lowrank_ptr + rows[:, None] * rank + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    lora_A_offsets = ranks[:, None] * width + cols[None, :]
    lora_A_mask = rank_mask[:, None] & col_mask[None, :]
    acc += lora_scale * tl.dot(grad_lowrank, tl.load(lora_A_ptr + lora_A_offsets, mask=lora_A_mask, other=0.0), input_precision=PRECISION)
    # Recompute the activation from the stored pre-activations instead of storing it.
    offsets = rows[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    first = tl.load(first_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    first_act, first_act_grad = _silu_and_grad(first)
    if GATED:
        second = tl.load(second_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        activation = first_act * second
    else:
        activation = first_act
    tl.store(partial_ptr + rows * num_col_blocks + col_block, tl.sum(acc * activation.to(dtype).to(tl.float32), axis=1), mask=row_mask)
    prob = tl.load(probs_ptr + rows * 2 + prob_column, mask=row_mask, other=0.0)
    activation_grad = acc * prob[:, None]
    if GATED:
        tl.store(first_grad_ptr + offsets, (activation_grad * second * first_act_grad).to(dtype), mask=mask)
        tl.store(second_grad_ptr + offsets, (activation_grad * first_act).to(dtype), mask=mask)
    else:
        tl.store(first_grad_ptr + offsets, (activation_grad * first_act_grad).to(dtype), mask=mask)
    weighted_lowrank = (grad_lowrank.to(tl.float32) * prob[:, None]).to(dtype)
    lora_A_grad = lora_scale * tl.dot(tl.trans(weighted_lowrank), activation.to(dtype), input_precision=PRECISION)
    tl.atomic_add(lora_A_grad_ptr + lora_A_offsets, lora_A_grad, mask=lora_A_mask)


# partial is zeroed before each tuning trial: a trial with narrower tiles writes more column blocks.
@triton.autotune(configs=GEMM_CONFIGS, key=["hidden", "intermediate", "visual_size", "tokens_bucket"],
                 reset_to_zero=["partial_ptr"])
@triton.jit
def _mome_grad_input_kernel(
    x_ptr, gate_grad_ptr, up_grad_ptr, visual_grad_ptr, gate_weight_ptr, up_weight_ptr, fc1_weight_ptr,
    gate_grad_lowrank_ptr, up_grad_lowrank_ptr, fc1_grad_lowrank_ptr, gate_lora_A_ptr, up_lora_A_ptr,
    fc1_lora_A_ptr, logits_grad_ptr, router_weight_ptr, text_norm_ptr, visual_norm_ptr, rstd_ptr,
    scaled_grad_ptr, partial_ptr,
    tokens, tokens_bucket, hidden, intermediate, visual_size, rank, num_col_blocks, lora_scale,
    RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Gradients of the two normalised inputs, then the per-tile half of the RMSNorm backward.

    d(x_t) = dgate Wg + dup Wu + s (dgate Bg) Ag + s (dup Bu) Au + dlogits W_s;  d(x_v) = dfc1 W1 + s (dfc1 B1) A1.
    With g_t = w_t * d(x_t), g_v = w_v * d(x_v): writes scaled_grad = rstd_t g_t + rstd_v g_v (M, d)
    and partial[m, block, :] = (sum x g_t, sum x g_v) over this tile's columns (num_col_blocks
    is partial's row stride, sized for the narrowest tile; unused blocks stay zero).
    """
    row_block, col_block = _tile_coordinates(tokens, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < tokens, cols < hidden
    text_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, intermediate, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < intermediate
        grad_offsets = rows[:, None] * intermediate + ks[None, :]
        grad_mask = row_mask[:, None] & k_mask[None, :]
        weight_offsets = ks[:, None] * hidden + cols[None, :]
        weight_mask = k_mask[:, None] & col_mask[None, :]
        text_acc += tl.dot(tl.load(gate_grad_ptr + grad_offsets, mask=grad_mask, other=0.0),
                           tl.load(gate_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), input_precision=PRECISION)
        text_acc += tl.dot(tl.load(up_grad_ptr + grad_offsets, mask=grad_mask, other=0.0),
                           tl.load(up_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), input_precision=PRECISION)
    visual_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, visual_size, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < visual_size
        visual_acc += tl.dot(tl.load(visual_grad_ptr + rows[:, None] * visual_size + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0),
                             tl.load(fc1_weight_ptr + ks[:, None] * hidden + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0),
                             input_precision=PRECISION)
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    lowrank_offsets = rows[:, None] * rank + ranks[None, :]
    lowrank_mask = row_mask[:, None] & rank_mask[None, :]
    lora_A_offsets = ranks[:, None] * hidden + cols[None, :]
    lora_A_mask = rank_mask[:, None] & col_mask[None, :]
    text_acc += lora_scale * tl.dot(tl.load(gate_grad_lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0),
                                    tl.load(gate_lora_A_ptr + lora_A_offsets, mask=lora_A_mask, other=0.0), input_precision=PRECISION)
    text_acc += lora_scale * tl.dot(tl.load(up_grad_lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0),
                                    tl.load(up_lora_A_ptr + lora_A_offsets, mask=lora_A_mask, other=0.0), input_precision=PRECISION)
    visual_acc += lora_scale * tl.dot(tl.load(fc1_grad_lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0),
                                      tl.load(fc1_lora_A_ptr + lora_A_offsets, mask=lora_A_mask, other=0.0), input_precision=PRECISION)
    # The router's logits are x_t W_s^T + b_s: a rank-2 update, done elementwise.
    logit_grad_visual = tl.load(logits_grad_ptr + rows * 2, mask=row_mask, other=0.0)
    logit_grad_text = tl.load(logits_grad_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    router_visual = tl.load(router_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    router_text = tl.load(router_weight_ptr + hidden + cols, mask=col_mask, other=0.0).to(tl.float32)
    text_acc += logit_grad_visual[:, None] * router_visual[None, :] + logit_grad_text[:, None] * router_text[None, :]
    text_grad = text_acc * tl.load(text_norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    visual_grad = visual_acc * tl.load(visual_norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    text_rstd = tl.load(rstd_ptr + rows * 2, mask=row_mask, other=0.0)
    visual_rstd = tl.load(rstd_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    offsets = rows[:, None] * hidden + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(scaled_grad_ptr + offsets, text_rstd[:, None] * text_grad + visual_rstd[:, None] * visual_grad, mask=mask)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    partial_offsets = (rows * num_col_blocks + col_block) * 2
    tl.store(partial_ptr + partial_offsets, tl.sum(x * text_grad, axis=1), mask=row_mask)
    tl.store(partial_ptr + partial_offsets + 1, tl.sum(x * visual_grad, axis=1), mask=row_mask)


def _launch_options(dtype: torch.dtype) -> dict:
    return dict(PRECISION=_dot_precision(dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _tile_grid(tokens: int, width: int):
    """1-D grid of (tokens / BLOCK_M) x (width / BLOCK_N) tiles, ordered by _tile_coordinates."""
    return lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)


def mome_forward(x, weights):
    """Launch the forward. x: (M, d); weights: the op's MoMEWeights (any object with its fields).

    Returns (output (M, d), residuals): the residuals in the order and meaning of
    mkfast.ops.mome.MoMEResiduals.
    """
    w = weights
    tokens, hidden = x.shape
    intermediate, visual_size, rank = w.gate_weight.shape[0], w.fc1_weight.shape[0], w.gate_lora_A.shape[0]
    dtype, device = x.dtype, x.device
    output = torch.empty((tokens, hidden), dtype=dtype, device=device)
    gate_pre = torch.empty((tokens, intermediate), dtype=dtype, device=device)
    up_pre = torch.empty_like(gate_pre)
    visual_pre = torch.empty((tokens, visual_size), dtype=dtype, device=device)
    text_lowrank = torch.empty((tokens, 2 * rank), dtype=dtype, device=device)
    visual_lowrank, down_lowrank, fc2_lowrank = (torch.empty((tokens, rank), dtype=dtype, device=device)
                                                 for _ in range(3))
    probs = torch.empty((tokens, 2), dtype=torch.float32, device=device)
    rstd = torch.empty((tokens, 2), dtype=torch.float32, device=device)
    residuals = (gate_pre, up_pre, visual_pre, text_lowrank, visual_lowrank, down_lowrank, fc2_lowrank, probs, rstd)
    if tokens == 0:
        return output, residuals
    options, rank_pad = _launch_options(dtype), _padded(rank)
    row_blocks = triton.cdiv(tokens, BLOCK_M)
    text_proj = torch.cat([w.gate_lora_A, w.up_lora_A, w.router_weight]).contiguous()
    _mome_lowrank_in_kernel[(row_blocks,)](
        x, w.text_norm_weight, w.visual_norm_weight, text_proj, w.fc1_lora_A, w.router_bias,
        text_lowrank, visual_lowrank, probs, rstd, tokens, hidden, rank, w.text_norm_eps, w.visual_norm_eps,
        TEXT_COLUMNS=_padded(2 * rank + 2), VISUAL_COLUMNS=rank_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, **options)
    tuned = dict(RANK_PAD=rank_pad, PRECISION=options["PRECISION"], GROUP_M=GROUP_M)
    tokens_bucket = triton.next_power_of_2(tokens)
    scale = w.lora_scale
    # The router-weighted activations feed the second layer and die with this call.
    text_act = torch.empty_like(gate_pre)
    visual_act = torch.empty_like(visual_pre)
    _mome_expert_in_kernel[_tile_grid(tokens, intermediate)](
        x, w.text_norm_weight, w.gate_weight, w.up_weight, text_lowrank, w.gate_lora_B, w.up_lora_B, rstd, probs,
        gate_pre, up_pre, text_act, tokens, tokens_bucket, hidden, intermediate, rank, 2 * rank, RSTD_TEXT,
        PROB_TEXT, scale, GATED=True, **tuned)
    _mome_expert_in_kernel[_tile_grid(tokens, visual_size)](
        x, w.visual_norm_weight, w.fc1_weight, w.fc1_weight, visual_lowrank, w.fc1_lora_B, w.fc1_lora_B, rstd, probs,
        visual_pre, visual_pre, visual_act, tokens, tokens_bucket, hidden, visual_size, rank, rank, RSTD_VISUAL,
        PROB_VISUAL, scale, GATED=False, **tuned)
    low_options = dict(RANK_PAD=rank_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, **options)
    _mome_act_lowrank_kernel[(row_blocks,)](text_act, w.down_lora_A, down_lowrank, tokens, intermediate, rank,
                                            **low_options)
    _mome_act_lowrank_kernel[(row_blocks,)](visual_act, w.fc2_lora_A, fc2_lowrank, tokens, visual_size, rank,
                                            **low_options)
    _mome_expert_out_kernel[_tile_grid(tokens, hidden)](
        text_act, visual_act, w.down_weight, w.fc2_weight, down_lowrank, fc2_lowrank, w.down_lora_B, w.fc2_lora_B,
        output, tokens, tokens_bucket, hidden, intermediate, visual_size, rank, scale, **tuned)
    return output, residuals


def expert_grad_hidden(grad_output, out_weight, lora_A, grad_lowrank, first, second, probs, prob_column, lora_scale):
    """Launch one expert's hidden-layer gradient (the math: mkfast/ops/mome_fused.py).

    grad_output: (M, d); out_weight: (d, width); lora_A: (r, width); grad_lowrank = g B_out: (M, r);
    first, second: the pre-activations (M, width) (second None for the ungated visual expert).
    Returns (dS (M,) fp32, d(first), d(second) or None, dA_out (r, width) fp32).
    """
    tokens, hidden = grad_output.shape
    width, rank = first.shape[1], lora_A.shape[0]
    gated = second is not None
    col_blocks = triton.cdiv(width, BLOCK_N)
    partial = torch.empty((tokens, col_blocks), dtype=torch.float32, device=first.device)
    first_grad = torch.empty_like(first)
    second_grad = torch.empty_like(second) if gated else first_grad
    lora_A_grad = torch.zeros(lora_A.shape, dtype=torch.float32, device=first.device)
    _mome_expert_grad_hidden_kernel[(triton.cdiv(tokens, BLOCK_M) * col_blocks,)](
        grad_output, out_weight, grad_lowrank, lora_A, first, second if gated else first, probs, partial,
        first_grad, second_grad, lora_A_grad, tokens, hidden, width, rank, prob_column, col_blocks, lora_scale,
        GATED=gated, RANK_PAD=_padded(rank), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
        **_launch_options(first.dtype))
    return partial.sum(dim=1), first_grad, second_grad if gated else None, lora_A_grad


def grad_input(x, gate_grad, up_grad, visual_grad, gate_grad_lowrank, up_grad_lowrank, fc1_grad_lowrank,
               logits_grad, weights, rstd):
    """Launch the gradient of both normalised inputs and the per-tile half of the RMSNorm backward.

    Returns (rstd_t w_t.d(x_t) + rstd_v w_v.d(x_v) (M, d) fp32, per-row [sum x w_t.d(x_t),
    sum x w_v.d(x_v)] (M, 2) fp32); the row-wide half is finished by the caller.
    """
    w = weights
    tokens, hidden = x.shape
    intermediate, visual_size, rank = w.gate_weight.shape[0], w.fc1_weight.shape[0], w.gate_lora_A.shape[0]
    col_blocks = triton.cdiv(hidden, SMALLEST_GEMM_BLOCK_N)
    scaled_grad = torch.empty((tokens, hidden), dtype=torch.float32, device=x.device)
    partial = torch.zeros((tokens, col_blocks, 2), dtype=torch.float32, device=x.device)
    _mome_grad_input_kernel[_tile_grid(tokens, hidden)](
        x, gate_grad, up_grad, visual_grad, w.gate_weight, w.up_weight, w.fc1_weight, gate_grad_lowrank,
        up_grad_lowrank, fc1_grad_lowrank, w.gate_lora_A, w.up_lora_A, w.fc1_lora_A, logits_grad, w.router_weight,
        w.text_norm_weight, w.visual_norm_weight, rstd, scaled_grad, partial, tokens, triton.next_power_of_2(tokens),
        hidden, intermediate, visual_size, rank, col_blocks, w.lora_scale, RANK_PAD=_padded(rank),
        PRECISION=_dot_precision(x.dtype), GROUP_M=GROUP_M)
    return scaled_grad, partial.sum(dim=1)
