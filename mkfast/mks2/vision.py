"""The vision side of MKS2: frozen BLIP-2 ViT + Q-Former -> 32 soft tokens -> a trainable projection.

MKS2 (docs/methods.md: images enter as 32 soft tokens): the frozen BLIP-2 image encoder and
Q-Former give ``num_query_tokens`` (32) vectors per image; a learnable linear layer maps
them into the LLM's embedding space, and two learnable embeddings <img-start> /
<img-end> bracket them. The image's global feature for the stage-1 InfoNCE is the
ViT's pooled output (its post-layer-normed first token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from mkfast.errors import UsageError

# BLIP-2's Q-Former uses 32 learned queries (BLIP-2 paper, Sec. 3.1; docs/methods.md).
NUM_QUERY_TOKENS = 32
# The <img-start>/<img-end> embeddings start at the scale of a Llama embedding row (init std 0.02).
IMAGE_TOKEN_INIT_STD = 0.02
# Prefixes of the three frozen parts inside a Blip2ForConditionalGeneration / Blip2Model checkpoint.
CHECKPOINT_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


@dataclass
class ImageFeatures:
    """What the frozen encoders give for a batch of images, computed once and reused (they never change):
    query_output (B, Q, D_qformer), global_features (B, D_vision)."""

    query_output: torch.Tensor
    global_features: torch.Tensor

    def __len__(self) -> int:
        return self.query_output.shape[0]

    def __getitem__(self, indices) -> ImageFeatures:
        return ImageFeatures(self.query_output[indices], self.global_features[indices])

    def to(self, device) -> ImageFeatures:
        return ImageFeatures(self.query_output.to(device), self.global_features.to(device))


class VisionAdapter(nn.Module):
    """Frozen image encoder + Q-Former, trainable projection and image boundary embeddings.

    encode(images: (B, 3, H, W)) -> soft tokens (B, Q, D_llm) and global features (B, D_vision).
    image_block(images) -> (B, Q + 2, D_llm): <img-start>, the Q projected tokens, <img-end>.
    """

    def __init__(self, vision_model: nn.Module, qformer: nn.Module, query_tokens: torch.Tensor,
                 language_hidden_size: int):
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        # (1, Q, D_qformer): frozen like the rest of BLIP-2; a buffer keeps it out of optimisers.
        self.register_buffer("query_tokens", query_tokens.detach().clone(), persistent=True)
        qformer_hidden_size = query_tokens.shape[-1]
        self.projection = nn.Linear(qformer_hidden_size, language_hidden_size)
        self.image_start = nn.Parameter(torch.randn(language_hidden_size) * IMAGE_TOKEN_INIT_STD)
        self.image_end = nn.Parameter(torch.randn(language_hidden_size) * IMAGE_TOKEN_INIT_STD)
        for parameter in list(self.vision_model.parameters()) + list(self.qformer.parameters()):
            parameter.requires_grad_(False)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def global_feature_size(self) -> int:
        return self.vision_model.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen encoders stay in eval mode (no dropout) whatever the adapter's mode.
        self.vision_model.eval()
        self.qformer.eval()
        return self

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor, batch_size: int = 256) -> ImageFeatures:
        """images: (B, 3, H, W) -> the frozen ViT + Q-Former outputs (in chunks of ``batch_size``)."""
        if images.dim() != 4:
            raise ValueError(f"VisionAdapter: images must be (B, 3, H, W), got {tuple(images.shape)}")
        device, dtype = self.projection.weight.device, self.projection.weight.dtype
        queries, globals_ = [], []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(device=device, dtype=dtype)
            vision_output = self.vision_model(pixel_values=chunk)
            image_embeds = vision_output.last_hidden_state
            query = self.query_tokens.expand(chunk.shape[0], -1, -1)
            image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)
            queries.append(self.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                                        encoder_attention_mask=image_mask).last_hidden_state)
            globals_.append(vision_output.pooler_output)
        return ImageFeatures(torch.cat(queries), torch.cat(globals_))

    def encode(self, images: torch.Tensor | ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), or their precomputed ImageFeatures ->
        (soft tokens (B, Q, D_llm), global features (B, D_vision))."""
        features = images if isinstance(images, ImageFeatures) else self.frozen_features(images)
        features = features.to(self.projection.weight.device)
        return self.projection(features.query_output), features.global_features

    def image_block(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        """soft_tokens: (B, Q, D) -> (B, Q + 2, D) bracketed by <img-start> and <img-end>."""
        batch = soft_tokens.shape[0]
        start = self.image_start.to(soft_tokens.dtype).expand(batch, 1, -1)
        end = self.image_end.to(soft_tokens.dtype).expand(batch, 1, -1)
        return torch.cat([start, soft_tokens, end], dim=1)


def small_vision_adapter(language_hidden_size: int, image_size: int = 32, patch_size: int = 8,
                         hidden_size: int = 64, qformer_hidden_size: int = 64,
                         num_query_tokens: int = NUM_QUERY_TOKENS, seed: int = 0) -> VisionAdapter:
    """A BLIP-2-shaped adapter built from small configs (tests and the digits demo: no weights to
    download)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vision_config = Blip2VisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                          num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
                                          patch_size=patch_size, initializer_range=0.02)
        qformer_config = Blip2QFormerConfig(hidden_size=qformer_hidden_size, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=2 * qformer_hidden_size,
                                            encoder_hidden_size=hidden_size, cross_attention_frequency=1,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        vision_model = Blip2VisionModel(vision_config).eval()
        qformer = Blip2QFormerModel(qformer_config).eval()
        query_tokens = torch.randn(1, num_query_tokens, qformer_hidden_size) * 0.02
        return VisionAdapter(vision_model, qformer, query_tokens, language_hidden_size)
    finally:
        torch.random.set_rng_state(generator_state)


def _checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """The vision model, Q-Former and query tokens from a local BLIP-2 safetensors checkpoint (sharded or
    not)."""
    from safetensors import safe_open

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
        files = sorted({file for name, file in weight_map.items()
                        if name.startswith(CHECKPOINT_PREFIXES)})
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as handle:
            # safe_open handles are not iterable: keys() is their only listing.
            for name in handle.keys():  # noqa: SIM118
                if name.startswith(CHECKPOINT_PREFIXES):
                    tensors[name] = handle.get_tensor(name)
    if not tensors:
        raise ValueError(f"VisionAdapter: no {CHECKPOINT_PREFIXES} tensors in the safetensors files "
                         f"of {path}")
    return tensors


def load_blip2_vision_adapter(path: str, language_hidden_size: int,
                              dtype: torch.dtype = torch.float32) -> VisionAdapter:
    """Vision adapter from a local BLIP-2 checkpoint directory (config.json + safetensors).

    Only the vision model, the Q-Former and the query tokens are read; the BLIP-2
    language model (FlanT5 / OPT) in the same checkpoint is never loaded.
    """
    from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

    if not os.path.isdir(path):
        raise UsageError(f"load_blip2_vision_adapter: path {path!r} must be a local checkpoint "
                         "directory")
    config = Blip2Config.from_pretrained(path, local_files_only=True)
    vision_model = Blip2VisionModel(config.vision_config)
    qformer = Blip2QFormerModel(config.qformer_config)
    tensors = _checkpoint_tensors(path)
    for module, prefix in ((vision_model, "vision_model."), (qformer, "qformer.")):
        state = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"VisionAdapter: checkpoint {path} lacks {prefix}{missing[:3]}... "
                             f"({len(missing)} tensors)")
    if "query_tokens" not in tensors:
        raise ValueError(f"VisionAdapter: checkpoint {path} has no query_tokens")
    adapter = VisionAdapter(vision_model.eval(), qformer.eval(), tensors["query_tokens"],
                            language_hidden_size)
    return adapter.to(dtype)
