"""Triton kernels of mome_ffn (MKS2 stage 2's soft mixture of a LoRA-SwiGLU and a LoRA-MVM).

The op's math and names are defined in mkfast/ops/mome.py; the backward's math, and the
rank-r products between these launches, in mkfast/ops/mome_fused.py. Per token block:

forward
  _mome_norm_in_kernel        both RMSNorms (x_t, x_v written once), the LoRA-A outputs of
                              gate/up/fc1 and the router logits + softmax
  _mome_expert_in_kernel      gate|up (or fc1) GEMM over the normalised input, LoRA as an
                              extra K-slice, S * SwiGLU (or S * SiLU) in the epilogue
  _mome_act_lowrank_kernel    LoRA-A of down / fc2 on the router-weighted activations
  _mome_expert_out_kernel     down and fc2 (and their LoRA-B) as one GEMM, one accumulator
backward
  _mome_out_lowrank_grad_kernel  g [B_d, B_2] and the LoRA-B gradients of down and fc2, on one read of g
  _mome_grad_hidden_kernel    both experts in one grid: u = g W_out + s (g B_out) A_out; epilogue: dS
                              row sums, dgate/dup (or dfc1), dA_out, and the rank-r products of
                              dgate/dup/dfc1 (d(pre) B and dB), so they are not read back
  _mome_grad_input_kernel     d(x_t) and d(x_v) from both experts and the router in one
                              output tile, with the per-row sums the RMSNorm backward needs
  _mome_norm_backward_kernel  the RMSNorm backward's row-wide half, written in x's dtype, and the
                              x^T products of the LoRA-A and router gradients on the same read of x

Stored for backward: gate/up/fc1 pre-activations (2 I + Iv per token) and rank-r outputs;
the activations (I + Iv per token) are written once in forward for the second layer and
freed when it returns: recomputing SwiGLU in the down GEMM's prologue instead would redo
it once per output-column tile (d / BLOCK_N = 32 times at Llama-2-7B sizes).

The frozen RMSNorm weights are applied once per element by norm_in, not folded into cached copies
of W_gate, W_up and W_fc1: the copies would hold (2 I + Iv) d elements (188.7 MB per layer in bf16)
to save the 2d elements per token of x_t and x_v written in forward (docs/performance.md, "MoME").

Memory traffic per token, activations only (weights are read once per GEMM wave and
amortised over the tokens), in elements of x's dtype, counted from the launches below;
d = 4096, I = 11008, Iv = 1024 (Llama-2-7B), rank-r and fp32 (M, 2) terms left out.
  frozen GEMMs alone, forward: x read by gate, up, fc1 (3d), gate/up/fc1 written (2I + Iv),
      h and a_v read by down/fc2 (I + Iv), out written twice (2d)          5d + 3I + 2Iv = 55.6 K
  ours, forward: norm_in reads x twice, writes x_t, x_v (4d); expert_in reads them (2d),
      writes pre-activations and activations (3I + 2Iv); act_lowrank and expert_out each
      read the activations (2I + 2Iv); out written once (d)                7d + 5I + 4Iv = 87.8 K (1.58x)
  frozen GEMMs alone, backward (input gradients): g read by down/fc2 (2d), dh and dh_v
      written (I + Iv), read by gate/up/fc1 (2I + Iv), dx written three times (3d)
                                                                           5d + 3I + 2Iv = 55.6 K
  ours, backward: g read by out_lowrank_grad and grad_hidden (2d); pre-activations read
      (2I + Iv), d(pre) written (2I + Iv) and read once by grad_input (2I + Iv); x read by
      grad_input and norm_backward (2d); scaled_grad fp32 written and read (4d); dx written (d)
                                                                           9d + 6I + 3Iv = 106.0 K (1.91x)
      (before the rank-r products moved into the kernels: 12d + 6I + 3Iv = 118.3 K, 2.13x: g read
      four times, x three.)
The frozen GEMMs move 2 * (3 I d + 2 Iv d) FLOPs per token each way (0.29 GFLOP): at an
H100 SXM's spec 3.35 TB/s and 989 TFLOP/s bf16 dense, 106 K elements (212 KB) would add up to
~22% of the GEMMs' time in backward if none of it overlapped them. Reads per wide tensor in
backward: g 2, x 2, pre-activations 1, d(pre) 1, scaled_grad 1. The rank-r side traffic left out
above: grad_hidden writes d(pre) B per 64-column half-tile, (2 I + Iv) / 64 * r fp32 per token
(2.9 K fp32, 5.8 K elements' worth), read once by its sum. A static count, not a measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per kernel. No GPU was available: each list
# keeps the tiles that compile for sm_90a (bf16, Llama-2-7B widths, Triton 3.8 + ptxas) with
# every tl.dot of the main loop on wgmma and no register spill (ptxas -v, and no local
# loads/stores in the SASS of a loop); the autotuner picks among them on the GPU. Dropped
# for spilling (bytes of spill stores): expert_in 64x128 and 128x64 on 4 warps (32, 64 B);
# grad_input 64x128 on 4 warps (980 B, loads and stores inside its K loop), 128x64 on 4 warps
# (456 B) and 128x128 on 8 warps (388 B).
EXPERT_IN_TILES = ((128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4))
EXPERT_OUT_TILES = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4))
GRAD_INPUT_TILES = ((64, 128, 64, 8, 3), (64, 64, 64, 4, 4))
# Fixed (its atomics and partial sums depend on the tile). 64x128 on 8 warps, its epilogue run on
# two 64-wide halves, compiles without spills under Triton 3.8 and 3.6 (247 / 255 registers, 76 KiB
# of shared memory). Spilling (bytes of spill stores + loads): 128x64 on 8 warps (44 B under 3.6,
# none under 3.8), 128x128 on 8 warps (1312 / 1356 B under 3.8 / 3.6), 64x256 on 8 warps (684 B, 3.8).
GRAD_HIDDEN_TILE = (64, 128, 64, 8, 3)
# The row kernels (norm_in, act_lowrank, out_lowrank_grad, norm_backward): (BLOCK_M, BLOCK_K, warps,
# stages). norm_backward runs NORM_BACKWARD_ROW_CHUNK rows per program (BLOCK_M at a time), so its
# atomic adds of x^T products number (M / chunk) * k * d, not (M / BLOCK_M) * k * d.
ROW_TILE = (64, 64, 4, 3)
NORM_BACKWARD_ROW_CHUNK = 512
if interpreter_enabled():
    # The interpreter runs 32-wide tiles: fewer, larger numpy ops are faster there, and
    # tl.dot needs every dimension >= 16.
    EXPERT_IN_TILES = EXPERT_OUT_TILES = GRAD_INPUT_TILES = ((32, 32, 32, 4, 1),)
    GRAD_HIDDEN_TILE, ROW_TILE = (32, 32, 32, 4, 1), (32, 32, 4, 1)
    NORM_BACKWARD_ROW_CHUNK = 64


def _configs(tiles) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
            for m, n, k, warps, stages in tiles]


GROUP_M = 8  # row blocks per group in the tile order (Triton matmul tutorial's value)
MIN_DOT_SIZE = 16  # smallest tl.dot dimension; LoRA ranks are padded up to it
# Columns of rstd (text norm, visual norm) and of the router probabilities (visual, text expert).
RSTD_TEXT, RSTD_VISUAL = 0, 1
PROB_VISUAL, PROB_TEXT = 0, 1
PROB_VISUAL_COLUMN, PROB_TEXT_COLUMN = tl.constexpr(PROB_VISUAL), tl.constexpr(PROB_TEXT)  # in kernels


def _padded(size: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(size))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dots so fp32 results match the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _tile_coordinates(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr):
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
def _mome_norm_in_kernel(
    x_ptr, text_norm_ptr, visual_norm_ptr, text_proj_ptr, visual_proj_ptr, router_bias_ptr,
    text_input_ptr, visual_input_ptr, text_lowrank_ptr, visual_lowrank_ptr, probs_ptr, rstd_ptr,
    tokens, hidden, rank, text_eps, visual_eps,
    TEXT_COLUMNS: tl.constexpr, VISUAL_COLUMNS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Both RMSNorms of a row block, the LoRA-A outputs of gate/up/fc1 and the router.

    text_proj: (2r+2, d) = [gate_A; up_A; router_W]; visual_proj: (r, d) = fc1_A. Writes
    text_input = x_t and visual_input = x_v (M, d), rounded as the reference rounds them,
    text_lowrank (M, 2r), visual_lowrank (M, r), probs (M, 2) fp32 and rstd (M, 2) fp32.
    The first pass over the rows sums squares; the second (from L2) normalises.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tokens
    sum_squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * hidden + ks[None, :],
                    mask=row_mask[:, None] & (ks < hidden)[None, :],
                    other=0.0).to(tl.float32)
        sum_squares += tl.sum(x * x, axis=1)
    text_rstd = 1.0 / tl.sqrt(sum_squares / hidden + text_eps)
    visual_rstd = 1.0 / tl.sqrt(sum_squares / hidden + visual_eps)
    text_cols = tl.arange(0, TEXT_COLUMNS)
    visual_cols = tl.arange(0, VISUAL_COLUMNS)
    text_acc = tl.zeros((BLOCK_M, TEXT_COLUMNS), dtype=tl.float32)
    visual_acc = tl.zeros((BLOCK_M, VISUAL_COLUMNS), dtype=tl.float32)
    dtype = text_input_ptr.dtype.element_ty
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        offsets = rows[:, None] * hidden + ks[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        text_norm = tl.load(text_norm_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        visual_norm = tl.load(visual_norm_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        # weight * (x * rstd).to(dtype), the reference's (Llama's) rounding.
        text_input = (text_norm[None, :] * (x * text_rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
        visual_input = (visual_norm[None, :] * (x * visual_rstd[:, None]).to(dtype).to(tl.float32)).to(dtype)
        tl.store(text_input_ptr + offsets, text_input, mask=mask)
        tl.store(visual_input_ptr + offsets, visual_input, mask=mask)
        text_proj = tl.load(text_proj_ptr + text_cols[None, :] * hidden + ks[:, None],
                            mask=(text_cols[None, :] < 2 * rank + 2) & k_mask[:, None], other=0.0)
        visual_proj = tl.load(visual_proj_ptr + visual_cols[None, :] * hidden + ks[:, None],
                              mask=(visual_cols[None, :] < rank) & k_mask[:, None], other=0.0)
        text_acc += tl.dot(text_input, text_proj, input_precision=PRECISION)
        visual_acc += tl.dot(visual_input, visual_proj, input_precision=PRECISION)
    tl.store(text_lowrank_ptr + rows[:, None] * (2 * rank) + text_cols[None, :], text_acc.to(dtype),
             mask=row_mask[:, None] & (text_cols[None, :] < 2 * rank))
    tl.store(visual_lowrank_ptr + rows[:, None] * rank + visual_cols[None, :], visual_acc.to(dtype),
             mask=row_mask[:, None] & (visual_cols[None, :] < rank))
    # Router epilogue: the two logits are columns 2r and 2r+1, rounded like the reference's
    # logits; a softmax of two is a sigmoid of the difference.
    logit_visual = tl.sum(tl.where(text_cols[None, :] == 2 * rank, text_acc, 0.0), axis=1)
    logit_text = tl.sum(tl.where(text_cols[None, :] == 2 * rank + 1, text_acc, 0.0), axis=1)
    logit_visual = logit_visual.to(dtype).to(tl.float32) + tl.load(router_bias_ptr).to(tl.float32)
    logit_text = logit_text.to(dtype).to(tl.float32) + tl.load(router_bias_ptr + 1).to(tl.float32)
    prob_visual = 1.0 / (1.0 + tl.exp(logit_text - logit_visual))
    tl.store(probs_ptr + rows * 2, prob_visual, mask=row_mask)
    tl.store(probs_ptr + rows * 2 + 1, 1.0 - prob_visual, mask=row_mask)
    tl.store(rstd_ptr + rows * 2, text_rstd, mask=row_mask)
    tl.store(rstd_ptr + rows * 2 + 1, visual_rstd, mask=row_mask)


# Tuned per (widths, power-of-two token count): training sees few distinct buckets.
@triton.autotune(configs=_configs(EXPERT_IN_TILES), key=["hidden", "width", "tokens_bucket"])
@triton.jit
def _mome_expert_in_kernel(
    input_ptr, first_weight_ptr, second_weight_ptr, lowrank_ptr, first_lora_B_ptr, second_lora_B_ptr,
    probs_ptr, first_out_ptr, second_out_ptr, activation_out_ptr,
    tokens, tokens_bucket, hidden, width, rank, lowrank_stride, prob_column, lora_scale,
    GATED: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """first_out = z W1^T + s lowrank[:, :r] B1^T: (M, width), z the normalised input (M, d);
    GATED also second_out from (W2, lowrank[:, r:2r], B2).

    The main loop is a plain GEMM (the norm was applied once, by _mome_norm_in_kernel); LoRA is
    one more K-slice of the same tile. Epilogue: activation_out = S * silu(first) * second (GATED,
    SwiGLU) or S * silu(first), from the values as rounded for storage, S = probs[:, prob_column]
    the expert's router weight, so both experts' second layers add into one accumulator. It
    feeds the second layer and is freed after forward (backward recomputes it).
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
        z = tl.load(input_ptr + rows[:, None] * hidden + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        weight_offsets = cols[None, :] * hidden + ks[:, None]  # W^T tile (BLOCK_K, BLOCK_N)
        weight_mask = col_mask[None, :] & k_mask[:, None]
        first_acc = tl.dot(z, tl.load(first_weight_ptr + weight_offsets, mask=weight_mask,
                                      other=0.0), first_acc,
                           input_precision=PRECISION)
        if GATED:
            second_acc = tl.dot(z, tl.load(second_weight_ptr + weight_offsets, mask=weight_mask, other=0.0),
                                second_acc, input_precision=PRECISION)
    # LoRA as one more K-slice of the same output tile: [z, z A^T] . [W0, s B]^T.
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    lowrank_offsets = rows[:, None] * lowrank_stride + ranks[None, :]
    lowrank_mask = row_mask[:, None] & rank_mask[None, :]
    lora_B_offsets = cols[None, :] * rank + ranks[:, None]  # B^T tile (RANK_PAD, BLOCK_N)
    lora_B_mask = col_mask[None, :] & rank_mask[:, None]
    lowrank = tl.load(lowrank_ptr + lowrank_offsets, mask=lowrank_mask, other=0.0)
    first_lora = tl.dot(lowrank, tl.load(first_lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0),
                        input_precision=PRECISION)
    out_offsets = rows[:, None] * width + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    dtype = first_out_ptr.dtype.element_ty
    first = (first_acc + lora_scale * first_lora).to(dtype)
    tl.store(first_out_ptr + out_offsets, first, mask=out_mask)
    first = first.to(tl.float32)
    activation = first / (1.0 + tl.exp(-first))
    if GATED:
        second_lowrank = tl.load(lowrank_ptr + lowrank_offsets + rank, mask=lowrank_mask, other=0.0)
        second_lora = tl.dot(second_lowrank, tl.load(second_lora_B_ptr + lora_B_offsets,
                                                     mask=lora_B_mask, other=0.0),
                             input_precision=PRECISION)
        second = (second_acc + lora_scale * second_lora).to(dtype)
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
        activation = tl.load(activation_ptr + rows[:, None] * width + ks[None, :],
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        lora_A = tl.load(lora_A_ptr + ranks[None, :] * width + ks[:, None],
                         mask=(ranks[None, :] < rank) & k_mask[:, None], other=0.0)
        acc += tl.dot(activation, lora_A, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (ranks[None, :] < rank))


@triton.jit
def _accumulate_row_major(acc, act_ptr, weight_ptr, rows, cols, row_mask, col_mask, width, weight_stride,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WEIGHT_K_MAJOR: tl.constexpr):
    """acc += act[rows, :] @ W over K = width; act: (M, width) row-major.

    W is weight[cols, :]^T for a (N, width) weight (nn.Linear layout, weight_stride = width), or
    weight[:, cols] for a K-major (width, N) one (WEIGHT_K_MAJOR, weight_stride = N).
    """
    for start in range(0, width, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < width
        act = tl.load(act_ptr + rows[:, None] * width + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                      other=0.0)
        if WEIGHT_K_MAJOR:
            weight_offsets = ks[:, None] * weight_stride + cols[None, :]
        else:
            weight_offsets = cols[None, :] * weight_stride + ks[:, None]
        weight = tl.load(weight_ptr + weight_offsets, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(act, weight, acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_configs(EXPERT_OUT_TILES),
                 key=["hidden", "intermediate", "visual_size", "tokens_bucket"])
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
    acc = _accumulate_row_major(acc, text_act_ptr, down_weight_ptr, rows, cols, row_mask, col_mask,
                                intermediate,
                                intermediate, BLOCK_K, PRECISION, WEIGHT_K_MAJOR=False)
    acc = _accumulate_row_major(acc, visual_act_ptr, fc2_weight_ptr, rows, cols, row_mask,
                                col_mask, visual_size,
                                visual_size, BLOCK_K, PRECISION, WEIGHT_K_MAJOR=False)
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
def _mome_out_lowrank_grad_kernel(
    grad_ptr, lora_B_ptr, down_lowrank_ptr, fc2_lowrank_ptr, grad_lowrank_ptr, lora_B_grad_ptr,
    tokens, hidden, rank, lora_scale,
    RANKS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """The second layers' rank-r products of g from one read of it, for a row block.

    lora_B: (d, 2r) = [B_d, B_2]; down/fc2_lowrank: (M, r), the router-weighted LoRA-A outputs
    saved in forward. Writes grad_lowrank = g [B_d, B_2] (M, 2r) and adds s g^T [l_d, l_2] into
    lora_B_grad (d, 2r) fp32, atomically over row blocks (the LoRA-B gradients of down and fc2).
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < tokens
    cols = tl.arange(0, RANKS_PAD)
    col_mask = cols < 2 * rank
    down_cols = cols < rank
    lowrank = tl.where(
        down_cols[None, :],
        tl.load(down_lowrank_ptr + rows[:, None] * rank + cols[None, :],
                mask=row_mask[:, None] & down_cols[None, :], other=0.0),
        tl.load(fc2_lowrank_ptr + rows[:, None] * rank + (cols - rank)[None, :],
                mask=row_mask[:, None] & (col_mask & ~down_cols)[None, :], other=0.0))
    acc = tl.zeros((BLOCK_M, RANKS_PAD), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        grad = tl.load(grad_ptr + rows[:, None] * hidden + ks[None, :],
                       mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        lora_B_offsets = ks[:, None] * (2 * rank) + cols[None, :]
        lora_B_mask = k_mask[:, None] & col_mask[None, :]
        acc = tl.dot(grad, tl.load(lora_B_ptr + lora_B_offsets, mask=lora_B_mask, other=0.0), acc,
                     input_precision=PRECISION)
        lora_B_grad = tl.dot(tl.trans(grad), lowrank, input_precision=PRECISION)
        tl.atomic_add(lora_B_grad_ptr + lora_B_offsets, lora_scale * lora_B_grad, mask=lora_B_mask)
    tl.store(grad_lowrank_ptr + rows[:, None] * (2 * rank) + cols[None, :],
             acc.to(grad_lowrank_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _rank_update(grad_tile, lora_B_ptr, lowrank_ptr, lowrank_stride, lowrank_grad_partial_ptr,
                 lora_B_grad_ptr,
                 rows, cols, ranks, row_mask, col_mask, rank, partial_stride, col_block, lora_scale,
                 PRECISION: tl.constexpr):
    """The rank-r products of one first-layer gradient tile d(pre) (BLOCK_M, BLOCK_N), as stored.

    Writes this column block's share of d(pre) B (the LoRA-A input gradient, summed over blocks by
    the launcher) and adds s d(pre)^T lowrank into dB (fp32, atomically over row blocks), so
    d(pre) is not read back from memory for either. Both are computed transposed, (r, .) = (r, K) .
    (K, .), with d(pre) as the second operand: as the first operand of a dot, the tile would pull
    the accumulator into a layout with warps along M only (each row held twice by 8 warps on 64
    rows), doubling the epilogue's registers.
    """
    rank_mask = ranks < rank
    lora_B_t = tl.load(lora_B_ptr + cols[None, :] * rank + ranks[:, None],
                       mask=col_mask[None, :] & rank_mask[:, None], other=0.0)
    lowrank_grad_t = tl.dot(lora_B_t, tl.trans(grad_tile), input_precision=PRECISION)
    tl.store(lowrank_grad_partial_ptr + rows[None, :] * partial_stride + col_block * rank + ranks[:, None],
             lowrank_grad_t, mask=row_mask[None, :] & rank_mask[:, None])
    lowrank_t = tl.load(lowrank_ptr + rows[None, :] * lowrank_stride + ranks[:, None],
                        mask=row_mask[None, :] & rank_mask[:, None], other=0.0)
    lora_B_grad_t = lora_scale * tl.dot(lowrank_t, grad_tile, input_precision=PRECISION)
    tl.atomic_add(lora_B_grad_ptr + cols[None, :] * rank + ranks[:, None], lora_B_grad_t,
                  mask=col_mask[None, :] & rank_mask[:, None])


@triton.jit
def _grad_hidden_epilogue(
    acc, grad_lowrank, prob, rows, local_rows, row_mask, cols, col_block, lora_A_ptr, first_ptr,
    first_lowrank_ptr, first_lora_B_ptr, second_ptr, second_lowrank_ptr, second_lora_B_ptr,
    score_partial_ptr, first_grad_ptr, second_grad_ptr, lora_A_grad_ptr, first_lowrank_grad_ptr,
    second_lowrank_grad_ptr, first_lora_B_grad_ptr, second_lora_B_grad_ptr, width, rank, lowrank_stride,
    num_col_blocks, lora_scale, GATED: tl.constexpr, RANK_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """The epilogue of one column sub-tile, acc = g W_out[:, cols] (see _expert_grad_hidden_tile)."""
    col_mask = cols < width
    dtype = first_grad_ptr.dtype.element_ty
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    lora_A_offsets = ranks[:, None] * width + cols[None, :]
    lora_A_mask = rank_mask[:, None] & col_mask[None, :]
    # Recompute the activation from the stored pre-activations instead of storing it.
    offsets = local_rows[:, None] * width + cols[None, :]  # from the row block's first row
    mask = row_mask[:, None] & col_mask[None, :]
    first = tl.load(first_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-first))
    silu = first * sigmoid
    if GATED:
        second = tl.load(second_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        activation = (silu * second).to(dtype)
    else:
        activation = silu.to(dtype)
    tl.store(score_partial_ptr + rows * num_col_blocks + col_block,
             tl.sum(acc * activation.to(tl.float32), axis=1),
             mask=row_mask)
    # dA_out first, so the activation tile dies before the gradient tiles are made. grad_lowrank
    # is s g B already.
    weighted_lowrank = (grad_lowrank.to(tl.float32) * prob[:, None]).to(dtype)
    lora_A_grad = tl.dot(tl.trans(weighted_lowrank), activation, input_precision=PRECISION)
    tl.atomic_add(lora_A_grad_ptr + lora_A_offsets, lora_A_grad, mask=lora_A_mask)
    acc = acc * prob[:, None]
    partial_stride = num_col_blocks * rank
    if GATED:
        second_grad = (acc * silu).to(dtype)
        tl.store(second_grad_ptr + offsets, second_grad, mask=mask)
        _rank_update(second_grad, second_lora_B_ptr, second_lowrank_ptr, lowrank_stride,
                     second_lowrank_grad_ptr, second_lora_B_grad_ptr, rows, cols, ranks, row_mask, col_mask,
                     rank, partial_stride, col_block, lora_scale, PRECISION)
        acc = acc * second
    first_grad = (acc * (sigmoid + silu * (1.0 - sigmoid))).to(dtype)  # silu' = s + silu (1 - s)
    tl.store(first_grad_ptr + offsets, first_grad, mask=mask)
    _rank_update(first_grad, first_lora_B_ptr, first_lowrank_ptr, lowrank_stride, first_lowrank_grad_ptr,
                 first_lora_B_grad_ptr, rows, cols, ranks, row_mask, col_mask, rank, partial_stride,
                 col_block, lora_scale, PRECISION)


@triton.jit
def _expert_grad_hidden_tile(
    row_block, col_block, grad_ptr, out_weight_ptr, grad_lowrank_ptr, grad_lowrank_stride, lora_A_ptr,
    probs_ptr, first_ptr, first_lowrank_ptr, first_lora_B_ptr, second_ptr, second_lowrank_ptr,
    second_lora_B_ptr, score_partial_ptr, first_grad_ptr, second_grad_ptr, lora_A_grad_ptr,
    first_lowrank_grad_ptr, second_lowrank_grad_ptr, first_lora_B_grad_ptr, second_lora_B_grad_ptr,
    tokens, hidden, width, rank, lowrank_stride, num_col_blocks, lora_scale,
    PROB_COLUMN: tl.constexpr, GATED: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One expert's hidden-layer gradient on one tile. g: (M, d), out_weight: (d, width),
    grad_lowrank = g B_out: (M, r) with row stride grad_lowrank_stride.

    u = g W_out + s (g B_out) A_out (the gradient of the expert's activation a, before its router
    weight S). Writes score_partial[m, sub-tile] = sum_n u*a (for dS), d(pre) = S u act'(pre), adds
    dA_out += s (S g B_out)^T a, and the rank-r products of d(pre) (see _rank_update). The main loop
    keeps two accumulators of BLOCK_N / 2 columns and the epilogue runs on one at a time, so its
    temporaries (the activation, its derivative, d(pre) in several layouts) take the registers of
    half a tile. num_col_blocks counts sub-tiles.
    """
    HALF: tl.constexpr = BLOCK_N // 2
    # The row block's start goes into the base pointers (64-bit scalars), so the offsets of the
    # (BLOCK_M, BLOCK_N) tiles are 32-bit: half the registers of 64-bit ones.
    row_start = row_block.to(tl.int64) * BLOCK_M
    local_rows = tl.arange(0, BLOCK_M)
    rows = row_start + local_rows
    grad_ptr += row_start * hidden
    first_ptr += row_start * width
    second_ptr += row_start * width
    first_grad_ptr += row_start * width
    second_grad_ptr += row_start * width
    cols = col_block * BLOCK_N + tl.arange(0, HALF)
    row_mask = rows < tokens
    # LoRA first, as the accumulators' initial value: [s g B, g] . [A; W]. After the main loop, a
    # dot with a register operand would move the tile into a layout with warps along M only (see
    # _rank_update). s g B is rounded to x's dtype once (exact for power-of-two s = alpha / r).
    ranks = tl.arange(0, RANK_PAD)
    grad_lowrank = tl.load(grad_lowrank_ptr + rows[:, None] * grad_lowrank_stride + ranks[None, :],
                           mask=row_mask[:, None] & (ranks < rank)[None, :], other=0.0)
    grad_lowrank = (grad_lowrank.to(tl.float32) * lora_scale).to(grad_lowrank.dtype)
    lora_A_offsets = ranks[:, None] * width + cols[None, :]
    lora_A_mask = (ranks < rank)[:, None]
    low_acc = tl.dot(grad_lowrank, tl.load(lora_A_ptr + lora_A_offsets,
                                           mask=lora_A_mask & (cols < width)[None, :], other=0.0),
                     input_precision=PRECISION)
    high_acc = tl.dot(grad_lowrank, tl.load(lora_A_ptr + lora_A_offsets + HALF,
                                            mask=lora_A_mask & (cols + HALF < width)[None, :], other=0.0),
                      input_precision=PRECISION)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        grad = tl.load(grad_ptr + local_rows[:, None] * hidden + ks[None, :],
                       mask=row_mask[:, None] & k_mask[None, :],
                       other=0.0)
        weight_offsets = ks[:, None] * width + cols[None, :]
        low_acc = tl.dot(grad, tl.load(out_weight_ptr + weight_offsets,
                                       mask=k_mask[:, None] & (cols < width)[None, :], other=0.0),
                         low_acc, input_precision=PRECISION)
        high_acc = tl.dot(grad, tl.load(out_weight_ptr + weight_offsets + HALF,
                                        mask=k_mask[:, None] & (cols + HALF < width)[None, :], other=0.0),
                          high_acc, input_precision=PRECISION)
    prob = tl.load(probs_ptr + rows * 2 + PROB_COLUMN, mask=row_mask, other=0.0)
    _grad_hidden_epilogue(
        low_acc, grad_lowrank, prob, rows, local_rows, row_mask, cols, 2 * col_block, lora_A_ptr, first_ptr,
        first_lowrank_ptr, first_lora_B_ptr, second_ptr, second_lowrank_ptr, second_lora_B_ptr,
        score_partial_ptr, first_grad_ptr, second_grad_ptr, lora_A_grad_ptr, first_lowrank_grad_ptr,
        second_lowrank_grad_ptr, first_lora_B_grad_ptr, second_lora_B_grad_ptr, width, rank, lowrank_stride,
        num_col_blocks, lora_scale, GATED=GATED, RANK_PAD=RANK_PAD, PRECISION=PRECISION)
    _grad_hidden_epilogue(
        high_acc, grad_lowrank, prob, rows, local_rows, row_mask, cols + HALF, 2 * col_block + 1, lora_A_ptr,
        first_ptr, first_lowrank_ptr, first_lora_B_ptr, second_ptr, second_lowrank_ptr, second_lora_B_ptr,
        score_partial_ptr, first_grad_ptr, second_grad_ptr, lora_A_grad_ptr, first_lowrank_grad_ptr,
        second_lowrank_grad_ptr, first_lora_B_grad_ptr, second_lora_B_grad_ptr, width, rank, lowrank_stride,
        num_col_blocks, lora_scale, GATED=GATED, RANK_PAD=RANK_PAD, PRECISION=PRECISION)


@triton.jit
def _mome_grad_hidden_kernel(
    grad_ptr, grad_lowrank_ptr, probs_ptr,
    down_weight_ptr, down_lora_A_ptr, gate_ptr, up_ptr, text_lowrank_ptr, gate_lora_B_ptr, up_lora_B_ptr,
    text_score_ptr, gate_grad_ptr, up_grad_ptr, down_lora_A_grad_ptr, gate_lowrank_grad_partial_ptr,
    up_lowrank_grad_partial_ptr, gate_lora_B_grad_ptr, up_lora_B_grad_ptr,
    fc2_weight_ptr, fc2_lora_A_ptr, fc1_ptr, visual_lowrank_ptr, fc1_lora_B_ptr,
    visual_score_ptr, fc1_grad_ptr, fc2_lora_A_grad_ptr, fc1_lowrank_grad_partial_ptr, fc1_lora_B_grad_ptr,
    tokens, hidden, intermediate, visual_size, rank, lora_scale,
    RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Both experts' hidden-layer gradients in one launch: u = g [W_d, W_2] + s (g [B_d, B_2]) [A_d, A_2].

    The column blocks of the text expert (I wide) and then the visual one (Iv) form one grid in the
    grouped tile order, so every row block of g is read from memory once for both experts (two
    launches would read g twice). grad_lowrank = g [B_d, B_2]: (M, 2r); text_lowrank = [l_gate, l_up]
    (M, 2r); visual_lowrank = l_fc1 (M, r). Per expert, see _expert_grad_hidden_tile.
    """
    text_col_blocks = tl.cdiv(intermediate, BLOCK_N)
    visual_col_blocks = tl.cdiv(visual_size, BLOCK_N)
    row_block, col_block = _tile_coordinates(tokens, (text_col_blocks + visual_col_blocks) * BLOCK_N,
                                             BLOCK_M, BLOCK_N, GROUP_M)
    if col_block < text_col_blocks:
        _expert_grad_hidden_tile(
            row_block, col_block, grad_ptr, down_weight_ptr, grad_lowrank_ptr, 2 * rank, down_lora_A_ptr,
            probs_ptr, gate_ptr, text_lowrank_ptr, gate_lora_B_ptr, up_ptr, text_lowrank_ptr + rank,
            up_lora_B_ptr, text_score_ptr, gate_grad_ptr, up_grad_ptr, down_lora_A_grad_ptr,
            gate_lowrank_grad_partial_ptr, up_lowrank_grad_partial_ptr, gate_lora_B_grad_ptr,
            up_lora_B_grad_ptr, tokens, hidden, intermediate, rank, 2 * rank, 2 * text_col_blocks, lora_scale,
            PROB_COLUMN=PROB_TEXT_COLUMN, GATED=True, RANK_PAD=RANK_PAD, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, PRECISION=PRECISION)
    else:
        _expert_grad_hidden_tile(
            row_block, col_block - text_col_blocks, grad_ptr, fc2_weight_ptr, grad_lowrank_ptr + rank,
            2 * rank, fc2_lora_A_ptr, probs_ptr, fc1_ptr, visual_lowrank_ptr, fc1_lora_B_ptr, fc1_ptr,
            visual_lowrank_ptr, fc1_lora_B_ptr, visual_score_ptr, fc1_grad_ptr, fc1_grad_ptr,
            fc2_lora_A_grad_ptr, fc1_lowrank_grad_partial_ptr, fc1_lowrank_grad_partial_ptr,
            fc1_lora_B_grad_ptr, fc1_lora_B_grad_ptr, tokens, hidden, visual_size, rank, rank,
            2 * visual_col_blocks, lora_scale,
            PROB_COLUMN=PROB_VISUAL_COLUMN, GATED=False, RANK_PAD=RANK_PAD, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=PRECISION)


# partial is zeroed before each tuning trial: a trial with narrower tiles writes more column blocks.
@triton.autotune(configs=_configs(GRAD_INPUT_TILES),
                 key=["hidden", "intermediate", "visual_size", "tokens_bucket"],
                 reset_to_zero=["partial_ptr"])
@triton.jit
def _mome_grad_input_kernel(
    x_ptr, gate_grad_ptr, up_grad_ptr, visual_grad_ptr, gate_weight_ptr, up_weight_ptr, fc1_weight_ptr,
    text_lowrank_grad_ptr, fc1_lowrank_grad_ptr, text_lora_A_ptr, fc1_lora_A_ptr, logits_grad_ptr,
    router_weight_ptr, text_norm_ptr, visual_norm_ptr, rstd_ptr, scaled_grad_ptr, partial_ptr,
    tokens, tokens_bucket, hidden, intermediate, visual_size, rank, num_col_blocks, lora_scale,
    RANK_PAD: tl.constexpr, TEXT_RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Gradients of the two normalised inputs, then the per-tile half of the RMSNorm backward.

    d(x_t) = dgate Wg + dup Wu + s [dgate Bg, dup Bu] [Ag; Au] + dlogits W_s;
    d(x_v) = dfc1 W1 + s (dfc1 B1) A1. text_lowrank_grad: (M, 2r) = [dgate Bg, dup Bu];
    text_lora_A: (2r, d) = [Ag; Au]. With g_t = w_t * d(x_t), g_v = w_v * d(x_v): writes
    scaled_grad = rstd_t g_t + rstd_v g_v (M, d) fp32 and partial[m, block, :] = (sum x g_t,
    sum x g_v) over this tile's columns (num_col_blocks is partial's row stride, sized for the
    narrowest tile; unused blocks stay zero). Two accumulators: each expert's norm weight
    scales its own columns, so they cannot share one.
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
        text_acc = tl.dot(tl.load(gate_grad_ptr + grad_offsets, mask=grad_mask, other=0.0),
                          tl.load(gate_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), text_acc,
                          input_precision=PRECISION)
        text_acc = tl.dot(tl.load(up_grad_ptr + grad_offsets, mask=grad_mask, other=0.0),
                          tl.load(up_weight_ptr + weight_offsets, mask=weight_mask, other=0.0), text_acc,
                          input_precision=PRECISION)
    visual_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    visual_acc = _accumulate_row_major(visual_acc, visual_grad_ptr, fc1_weight_ptr, rows, cols,
                                       row_mask, col_mask,
                                       visual_size, hidden, BLOCK_K, PRECISION, WEIGHT_K_MAJOR=True)
    text_ranks = tl.arange(0, TEXT_RANK_PAD)
    text_rank_mask = text_ranks < 2 * rank
    text_lowrank_grad = tl.load(text_lowrank_grad_ptr + rows[:, None] * (2 * rank) + text_ranks[None, :],
                                mask=row_mask[:, None] & text_rank_mask[None, :], other=0.0)
    text_lora_A = tl.load(text_lora_A_ptr + text_ranks[:, None] * hidden + cols[None, :],
                          mask=text_rank_mask[:, None] & col_mask[None, :], other=0.0)
    text_acc += lora_scale * tl.dot(text_lowrank_grad, text_lora_A, input_precision=PRECISION)
    ranks = tl.arange(0, RANK_PAD)
    rank_mask = ranks < rank
    fc1_lowrank_grad = tl.load(fc1_lowrank_grad_ptr + rows[:, None] * rank + ranks[None, :],
                               mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    fc1_lora_A = tl.load(fc1_lora_A_ptr + ranks[:, None] * hidden + cols[None, :],
                         mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    visual_acc += lora_scale * tl.dot(fc1_lowrank_grad, fc1_lora_A, input_precision=PRECISION)
    # The router's logits are x_t W_s^T + b_s: a rank-2 update, done elementwise.
    logit_grad_visual = tl.load(logits_grad_ptr + rows * 2, mask=row_mask, other=0.0)
    logit_grad_text = tl.load(logits_grad_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    router_visual = tl.load(router_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    router_text = tl.load(router_weight_ptr + hidden + cols, mask=col_mask, other=0.0).to(tl.float32)
    text_acc += logit_grad_visual[:, None] * router_visual[None, :]
    text_acc += logit_grad_text[:, None] * router_text[None, :]
    text_grad = text_acc * tl.load(text_norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    visual_grad = visual_acc * tl.load(visual_norm_ptr + cols, mask=col_mask,
                                       other=0.0).to(tl.float32)[None, :]
    offsets = rows[:, None] * hidden + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    partial_offsets = (rows * num_col_blocks + col_block) * 2
    tl.store(partial_ptr + partial_offsets, tl.sum(x * text_grad, axis=1), mask=row_mask)
    tl.store(partial_ptr + partial_offsets + 1, tl.sum(x * visual_grad, axis=1), mask=row_mask)
    text_rstd = tl.load(rstd_ptr + rows * 2, mask=row_mask, other=0.0)
    visual_rstd = tl.load(rstd_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
    tl.store(scaled_grad_ptr + offsets, text_rstd[:, None] * text_grad + visual_rstd[:, None] * visual_grad,
             mask=mask)


@triton.jit
def _mome_norm_backward_kernel(
    x_ptr, scaled_grad_ptr, row_sums_ptr, rstd_ptr, lowrank_rows_ptr, x_grad_ptr, products_ptr,
    tokens, hidden, lowrank_width,
    LOWRANK_PAD: tl.constexpr, ROW_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """RMSNorm backward, the row-wide half, in x's dtype, and the x^T products, on one read of x.

    For ROW_CHUNK rows and BLOCK_K columns: dx = scaled_grad - x sum_n(rstd_n^3 sums_n) / d, and
    products[:, cols] += lowrank_rows^T x (lowrank_rows: (M, lowrank_width) in x's dtype; products
    fp32, one atomic add per chunk): the LoRA-A and router gradients read x here, not again.
    """
    first_row = tl.program_id(0) * ROW_CHUNK
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < hidden
    lowrank_cols = tl.arange(0, LOWRANK_PAD)
    lowrank_mask = lowrank_cols < lowrank_width
    products = tl.zeros((LOWRANK_PAD, BLOCK_K), dtype=tl.float32)
    for start in range(0, ROW_CHUNK, BLOCK_M):
        rows = (first_row + start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < tokens
        text_rstd = tl.load(rstd_ptr + rows * 2, mask=row_mask, other=0.0)
        visual_rstd = tl.load(rstd_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        text_sum = tl.load(row_sums_ptr + rows * 2, mask=row_mask, other=0.0)
        visual_sum = tl.load(row_sums_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        coefficient = (text_rstd * text_rstd * text_rstd * text_sum
                       + visual_rstd * visual_rstd * visual_rstd * visual_sum) / hidden
        offsets = rows[:, None] * hidden + ks[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        scaled = tl.load(scaled_grad_ptr + offsets, mask=mask, other=0.0)
        x_grad = scaled - x.to(tl.float32) * coefficient[:, None]
        tl.store(x_grad_ptr + offsets, x_grad.to(x_grad_ptr.dtype.element_ty), mask=mask)
        lowrank_rows = tl.load(lowrank_rows_ptr + rows[:, None] * lowrank_width + lowrank_cols[None, :],
                               mask=row_mask[:, None] & lowrank_mask[None, :], other=0.0)
        products = tl.dot(tl.trans(lowrank_rows), x, products, input_precision=PRECISION)
    tl.atomic_add(products_ptr + lowrank_cols[:, None] * hidden + ks[None, :], products,
                  mask=lowrank_mask[:, None] & k_mask[None, :])


def _tile_grid(tokens: int, width: int):
    """1-D grid of (tokens / BLOCK_M) x (width / BLOCK_N) tiles, ordered by _tile_coordinates."""
    return lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)


def _row_options(dtype: torch.dtype) -> dict:
    block_m, block_k, warps, stages = ROW_TILE
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


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
    residuals = (gate_pre, up_pre, visual_pre, text_lowrank, visual_lowrank, down_lowrank,
                 fc2_lowrank, probs, rstd)
    if tokens == 0:
        return output, residuals
    precision, rank_pad = _dot_precision(dtype), _padded(rank)
    row_options = _row_options(dtype)
    row_grid = (triton.cdiv(tokens, row_options["BLOCK_M"]),)
    text_proj = torch.cat([w.gate_lora_A, w.up_lora_A, w.router_weight]).contiguous()
    # The normalised inputs feed the first layers and die with this call.
    text_input, visual_input = torch.empty_like(x), torch.empty_like(x)
    _mome_norm_in_kernel[row_grid](
        x, w.text_norm_weight, w.visual_norm_weight, text_proj, w.fc1_lora_A, w.router_bias, text_input,
        visual_input, text_lowrank, visual_lowrank, probs, rstd, tokens, hidden, rank, w.text_norm_eps,
        w.visual_norm_eps, TEXT_COLUMNS=_padded(2 * rank + 2), VISUAL_COLUMNS=rank_pad, PRECISION=precision,
        **row_options)
    tuned = dict(RANK_PAD=rank_pad, PRECISION=precision, GROUP_M=GROUP_M)
    tokens_bucket = triton.next_power_of_2(tokens)
    scale = w.lora_scale
    # The router-weighted activations feed the second layer and die with this call.
    text_act = torch.empty_like(gate_pre)
    visual_act = torch.empty_like(visual_pre)
    _mome_expert_in_kernel[_tile_grid(tokens, intermediate)](
        text_input, w.gate_weight, w.up_weight, text_lowrank, w.gate_lora_B, w.up_lora_B, probs, gate_pre,
        up_pre, text_act, tokens, tokens_bucket, hidden, intermediate, rank, 2 * rank, PROB_TEXT, scale,
        GATED=True, **tuned)
    _mome_expert_in_kernel[_tile_grid(tokens, visual_size)](
        visual_input, w.fc1_weight, w.fc1_weight, visual_lowrank, w.fc1_lora_B, w.fc1_lora_B, probs,
        visual_pre,
        visual_pre, visual_act, tokens, tokens_bucket, hidden, visual_size, rank, rank, PROB_VISUAL, scale,
        GATED=False, **tuned)
    for activation, lora_A, lowrank in ((text_act, w.down_lora_A, down_lowrank),
                                        (visual_act, w.fc2_lora_A, fc2_lowrank)):
        _mome_act_lowrank_kernel[row_grid](activation, lora_A, lowrank, tokens, activation.shape[1], rank,
                                           RANK_PAD=rank_pad, PRECISION=precision, **row_options)
    _mome_expert_out_kernel[_tile_grid(tokens, hidden)](
        text_act, visual_act, w.down_weight, w.fc2_weight, down_lowrank, fc2_lowrank, w.down_lora_B,
        w.fc2_lora_B,
        output, tokens, tokens_bucket, hidden, intermediate, visual_size, rank, scale, **tuned)
    return output, residuals


def out_lowrank_grads(grad_output, weights, residuals):
    """Launch the second layers' rank-r products of g (one read of g).

    Returns g [B_d, B_2] (M, 2r) in g's dtype and s g^T [l_d, l_2] (d, 2r) fp32, l the router-weighted
    LoRA-A outputs of down and fc2 saved in forward (residuals: mkfast.ops.mome.MoMEResiduals).
    """
    w, res = weights, residuals
    tokens, hidden = grad_output.shape
    rank = w.gate_lora_A.shape[0]
    grad_lowrank = torch.empty((tokens, 2 * rank), dtype=grad_output.dtype, device=grad_output.device)
    lora_B_grad = torch.zeros((hidden, 2 * rank), dtype=torch.float32, device=grad_output.device)
    row_options = _row_options(grad_output.dtype)
    _mome_out_lowrank_grad_kernel[(triton.cdiv(tokens, row_options["BLOCK_M"]),)](
        grad_output, torch.cat([w.down_lora_B, w.fc2_lora_B], dim=1).contiguous(),
        res.down_lowrank.contiguous(), res.fc2_lowrank.contiguous(), grad_lowrank, lora_B_grad,
        tokens, hidden, rank, w.lora_scale, RANKS_PAD=_padded(2 * rank),
        PRECISION=_dot_precision(grad_output.dtype), **row_options)
    return grad_lowrank, lora_B_grad


def grad_hidden(grad_output, grad_lowrank, weights, residuals):
    """Launch both experts' hidden-layer gradients in one grid (the math: mkfast/ops/mome_fused.py).

    grad_output: (M, d); grad_lowrank = g [B_d, B_2]: (M, 2r); residuals: MoMEResiduals. Returns
    (text, visual), each in mkfast.ops.mome_fused.ExpertGrads order: dS (M,) fp32, d(first),
    d(second), dA_out (r, width) fp32, d(first) B_first and d(second) B_second (M, r) fp32, dB_first
    and dB_second (width, r) fp32; the visual expert's second_* are None (it has no gate).
    """
    w, res = weights, residuals
    tokens, hidden = grad_output.shape
    intermediate, visual_size, rank = w.gate_weight.shape[0], w.fc1_weight.shape[0], w.gate_lora_A.shape[0]
    block_m, block_n, block_k, warps, stages = GRAD_HIDDEN_TILE
    col_tiles = triton.cdiv(intermediate, block_n) + triton.cdiv(visual_size, block_n)
    grid = (triton.cdiv(tokens, block_m) * col_tiles,)
    # Partial row sums per half-tile: the kernel's epilogue runs on column halves.
    text_blocks, visual_blocks = (2 * triton.cdiv(width, block_n) for width in (intermediate, visual_size))
    device = grad_output.device

    def fp32(*shape):
        return torch.empty(shape, dtype=torch.float32, device=device)

    def fp32_zeros(*shape):  # atomically accumulated
        return torch.zeros(shape, dtype=torch.float32, device=device)

    text_score, visual_score = fp32(tokens, text_blocks), fp32(tokens, visual_blocks)
    gate_grad, up_grad, fc1_grad = (torch.empty_like(pre)
                                    for pre in (res.gate_pre, res.up_pre, res.visual_pre))
    down_A_grad, fc2_A_grad = fp32_zeros(rank, intermediate), fp32_zeros(rank, visual_size)
    # d(pre) B per half-tile, summed below: a tile holds only its columns of d(pre).
    gate_lowrank_grad, up_lowrank_grad = fp32(tokens, text_blocks, rank), fp32(tokens, text_blocks, rank)
    fc1_lowrank_grad = fp32(tokens, visual_blocks, rank)
    gate_B_grad, up_B_grad, fc1_B_grad = (fp32_zeros(intermediate, rank), fp32_zeros(intermediate, rank),
                                          fp32_zeros(visual_size, rank))
    _mome_grad_hidden_kernel[grid](
        grad_output, grad_lowrank, res.router_probs,
        w.down_weight, w.down_lora_A, res.gate_pre, res.up_pre, res.text_lowrank.contiguous(), w.gate_lora_B,
        w.up_lora_B, text_score, gate_grad, up_grad, down_A_grad, gate_lowrank_grad, up_lowrank_grad,
        gate_B_grad, up_B_grad,
        w.fc2_weight, w.fc2_lora_A, res.visual_pre, res.visual_lowrank.contiguous(), w.fc1_lora_B,
        visual_score, fc1_grad, fc2_A_grad, fc1_lowrank_grad, fc1_B_grad,
        tokens, hidden, intermediate, visual_size, rank, w.lora_scale, RANK_PAD=_padded(rank),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_dot_precision(grad_output.dtype),
        GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)
    text = (text_score.sum(dim=1), gate_grad, up_grad, down_A_grad, gate_lowrank_grad.sum(dim=1),
            up_lowrank_grad.sum(dim=1), gate_B_grad, up_B_grad)
    visual = (visual_score.sum(dim=1), fc1_grad, None, fc2_A_grad, fc1_lowrank_grad.sum(dim=1), None,
              fc1_B_grad, None)
    return text, visual


def grad_input(x, gate_grad, up_grad, visual_grad, text_lowrank_grad, fc1_lowrank_grad, logits_grad,
               weights, rstd, lowrank_rows):
    """Launch d(x): both normalised inputs' gradients, then both RMSNorms' backward, in x's dtype;
    and lowrank_rows^T x (the LoRA-A and router gradients' products) from the same read of x.

    text_lowrank_grad: (M, 2r) = [dgate B_gate, dup B_up]; fc1_lowrank_grad: (M, r); logits_grad:
    (M, 2) fp32; rstd: (M, 2) fp32; lowrank_rows: (M, k) in x's dtype (the math:
    mkfast/ops/mome_fused.py). Returns (dx, lowrank_rows^T x (k, d) fp32).
    """
    w = weights
    tokens, hidden = x.shape
    intermediate, visual_size, rank = w.gate_weight.shape[0], w.fc1_weight.shape[0], w.gate_lora_A.shape[0]
    col_blocks = triton.cdiv(hidden, min(tile[1] for tile in GRAD_INPUT_TILES))
    scaled_grad = torch.empty((tokens, hidden), dtype=torch.float32, device=x.device)
    partial = torch.zeros((tokens, col_blocks, 2), dtype=torch.float32, device=x.device)
    text_lora_A = torch.cat([w.gate_lora_A, w.up_lora_A]).contiguous()
    precision = _dot_precision(x.dtype)
    _mome_grad_input_kernel[_tile_grid(tokens, hidden)](
        x, gate_grad, up_grad, visual_grad, w.gate_weight, w.up_weight, w.fc1_weight,
        text_lowrank_grad.to(x.dtype).contiguous(), fc1_lowrank_grad.to(x.dtype).contiguous(), text_lora_A,
        w.fc1_lora_A, logits_grad, w.router_weight, w.text_norm_weight, w.visual_norm_weight, rstd,
        scaled_grad,
        partial, tokens, triton.next_power_of_2(tokens), hidden, intermediate, visual_size, rank, col_blocks,
        w.lora_scale, RANK_PAD=_padded(rank), TEXT_RANK_PAD=_padded(2 * rank), PRECISION=precision,
        GROUP_M=GROUP_M)
    x_grad = torch.empty_like(x)
    lowrank_width = lowrank_rows.shape[1]
    products = torch.zeros((lowrank_width, hidden), dtype=torch.float32, device=x.device)
    row_options = _row_options(x.dtype)
    grid = (triton.cdiv(tokens, NORM_BACKWARD_ROW_CHUNK), triton.cdiv(hidden, row_options["BLOCK_K"]))
    _mome_norm_backward_kernel[grid](
        x, scaled_grad, partial.sum(dim=1), rstd, lowrank_rows.to(x.dtype).contiguous(), x_grad, products,
        tokens, hidden, lowrank_width, LOWRANK_PAD=_padded(lowrank_width), ROW_CHUNK=NORM_BACKWARD_ROW_CHUNK,
        PRECISION=precision, **row_options)
    return x_grad, products
