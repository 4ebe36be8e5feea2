"""VQGAN image tokenizer with the taming-transformers architecture (RA-CM3 "Documents").

RA-CM3 turns a 256x256 image into 32x32 = 1024 codes with a VQGAN (Esser et al.
2021). The encoder/decoder here follow taming-transformers' ``Encoder`` /
``Decoder`` (module names included, so a taming checkpoint's weights map by
name); the quantizer is vector-quantize-pytorch's ``VectorQuantize``. The only
key that changes name is the codebook (``quantize.embedding.weight`` in taming),
see :func:`taming_to_mkfast_state_dict`.

Shapes: images (B, 3, H, W) in [0, 1]; codes (B, H/f, W/f) int64 with
f = 2 ** (len(channel_multipliers) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mkfast.progress import progress_bar

# taming's Normalize: GroupNorm(32 groups, eps 1e-6); channel counts must be multiples of 32.
NORM_GROUPS = 32
# taming's VectorQuantizer weighs the commitment term with beta = 0.25.
COMMITMENT_WEIGHT = 0.25
# EMA codebook decay; vector-quantize-pytorch's default 0.8 adapts fast enough for
# a few hundred demo steps (0.99 left most of a 64-code book unused in our runs).
CODEBOOK_DECAY = 0.8


@dataclass
class VQGANConfig:
    """Defaults: taming's f8 model, 256x256 -> 32x32 codes, 8192-entry codebook."""

    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32,)
    z_channels: int = 256
    embedding_dim: int = 256
    codebook_size: int = 8192

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def codes_per_side(self) -> int:
        return self.resolution // self.downsampling_factor


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (taming's AttnBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (projection(h).reshape(batch, 1, channels, height * width).transpose(-1, -2)
                   for projection in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only, then a stride-2 valid conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attentions: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attentions)
    return level


def _middle(channels: int) -> nn.Module:
    middle = nn.Module()
    middle.block_1 = ResnetBlock(channels, channels)
    middle.attn_1 = AttnBlock(channels)
    middle.block_2 = ResnetBlock(channels, channels)
    return middle


class Encoder(nn.Module):
    """(B, in_channels, R, R) -> (B, z_channels, R/f, R/f)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        multipliers = (1,) + tuple(config.channel_multipliers)
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        resolution = config.resolution
        self.down = nn.ModuleList()
        for index in range(len(config.channel_multipliers)):
            channels_in = config.base_channels * multipliers[index]
            channels_out = config.base_channels * multipliers[index + 1]
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(channels_in, channels_out))
                channels_in = channels_out
                if resolution in config.attention_resolutions:
                    attentions.append(AttnBlock(channels_in))
            level = _level(blocks, attentions)
            if index != len(config.channel_multipliers) - 1:
                level.downsample = Downsample(channels_in)
                resolution //= 2
            self.down.append(level)
        self.mid = _middle(channels_in)
        self.norm_out = _normalize(channels_in)
        self.conv_out = nn.Conv2d(channels_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for index, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[index](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, R/f, R/f) -> (B, in_channels, R, R); ``up`` is indexed like taming (0 = finest)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        levels = len(config.channel_multipliers)
        channels = config.base_channels * config.channel_multipliers[-1]
        resolution = config.codes_per_side
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = _middle(channels)
        up_levels: list[nn.Module] = []
        for index in reversed(range(levels)):
            channels_out = config.base_channels * config.channel_multipliers[index]
            blocks, attentions = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, channels_out))
                channels = channels_out
                if resolution in config.attention_resolutions:
                    attentions.append(AttnBlock(channels))
            level = _level(blocks, attentions)
            if index != 0:
                level.upsample = Upsample(channels)
                resolution *= 2
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = _normalize(channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for index, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[index](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> VectorQuantize -> post_quant_conv -> Decoder."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.config = config = config or VQGANConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embedding_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embedding_dim, config.z_channels, 1)
        self.quantize = VectorQuantize(dim=config.embedding_dim, codebook_size=config.codebook_size,
                                       decay=CODEBOOK_DECAY, commitment_weight=COMMITMENT_WEIGHT,
                                       accept_image_fmap=True,
                                       # The library all-reduces EMA updates whenever torch.distributed is
                                       # initialised; the tokenizer trains on one rank (rank 0 of a DDP run).
                                       sync_codebook=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, R, R) in [0, 1] -> (reconstruction (B, 3, R, R), codes (B, r, r), commitment
        loss)."""
        latents = self.quant_conv(self.encoder(images * 2.0 - 1.0))  # taming works in [-1, 1]
        quantized, codes, commitment_loss = self.quantize(latents)
        return self._decode_latents(quantized), codes, commitment_loss

    def _decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        return (self.decoder(self.post_quant_conv(quantized)) + 1.0) / 2.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) in [0, 1] -> codes (B, R/f, R/f) int64, on the images' device."""
        was_training = self.training
        self.eval()  # no EMA codebook update while tokenizing
        model_images = images.to(next(self.parameters()).device)
        _, codes, _ = self.quantize(self.quant_conv(self.encoder(model_images * 2.0 - 1.0)))
        self.train(was_training)
        return codes.long().to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, r, r) int64 -> images (B, 3, R, R), clamped to [0, 1], on the codes' device."""
        # With accept_image_fmap the quantizer hands back channels first: (B, D, r, r).
        quantized = self.quantize.get_output_from_indices(codes.to(next(self.parameters()).device))
        return self._decode_latents(quantized).clamp(0.0, 1.0).to(codes.device)


def taming_to_mkfast_state_dict(taming_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a taming VQModel state dict onto :class:`VQGAN`'s keys.

    Encoder/decoder/conv keys keep their names; ``loss.*`` (discriminator,
    LPIPS) is dropped; the codebook ``quantize.embedding.weight`` (K, D) becomes
    vector-quantize-pytorch's EMA codebook (``embed`` (1, K, D), with
    ``embed_avg`` = embed and unit cluster sizes so an EMA step starts from it).
    """
    state = {key: value for key, value in taming_state.items()
             if not key.startswith("loss.") and not key.startswith("quantize.")}
    codebook = taming_state["quantize.embedding.weight"]
    state["quantize._codebook.embed"] = codebook.unsqueeze(0).clone()
    state["quantize._codebook.embed_avg"] = codebook.unsqueeze(0).clone()
    state["quantize._codebook.cluster_size"] = torch.ones(1, codebook.shape[0])
    state["quantize._codebook.initted"] = torch.tensor(True)
    return state


def mkfast_to_taming_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`taming_to_mkfast_state_dict` (for exporting, and for tests)."""
    taming = {key: value for key, value in state.items() if not key.startswith("quantize.")}
    taming["quantize.embedding.weight"] = state["quantize._codebook.embed"][0].clone()
    return taming


def load_taming_checkpoint(path: str, config: VQGANConfig) -> VQGAN:
    """A :class:`VQGAN` from a taming checkpoint file (``.ckpt`` with ``state_dict``, or a bare state
    dict)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    taming_state = payload.get("state_dict", payload)
    model = VQGAN(config)
    missing, unexpected = model.load_state_dict(taming_to_mkfast_state_dict(taming_state), strict=False)
    if missing or unexpected:
        raise ValueError(f"load_taming_checkpoint: {path} does not match the config: "
                         f"missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    return model


@dataclass
class VQTrainingConfig:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0


def train_image_tokenizer(model: VQGAN, images: torch.Tensor, config: VQTrainingConfig,
                          progress: bool = False) -> list[float]:
    """Reconstruction (L1 + MSE) + commitment training on ``images`` (N, 3, R, R); returns per-step losses.

    Perceptual/GAN losses of taming are left out: at the demo's 32x32 they cost
    more than they give, and codes only need to be faithful, not sharp.
    """
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in progress_bar(range(config.steps), desc="vq tokenizer", enabled=progress):
        # Indices drawn on the CPU: the same batches whichever device trains.
        rows = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        batch = images[rows].to(device)
        reconstruction, _, commitment_loss = model(batch)
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + commitment_loss.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
