"""RA-CM3's components besides the generator: image tokenizer, CLIP retriever, vocabulary.

Built (trained, or loaded from pretrained checkpoints) once per run and saved as one file,
``components.pt``, that `mkfast train racm3`, the demo and inference all read. The defaults
are sized for the embedded digits set (32x32 images).
"""

from __future__ import annotations

import torch

from mkfast.racm3.encoder import MixedModalEncoder, build_small_clip, train_clip
from mkfast.racm3.image_tokenizer import VQGAN, VQGANConfig, load_taming_checkpoint, train_image_tokenizer
from mkfast.racm3.vocabulary import CM3Vocabulary

IMAGE_SIZE = 32
# 32x32 -> 8x8 codes (two downsamples); 64 codes: digits are simple strokes and a
# larger book stays mostly unused after a few hundred steps.
DEMO_VQ = VQGANConfig(resolution=IMAGE_SIZE, base_channels=32, channel_multipliers=(1, 1, 2),
                      num_res_blocks=1, attention_resolutions=(), z_channels=32, embedding_dim=32,
                      codebook_size=64)
# Text BPE of 300 = 256 bytes + merges enough to make each caption word a token or two.
DEMO_TEXT_VOCABULARY = 300
COMPONENTS_FILE = "components.pt"  # VQ + CLIP state dicts and the vocabulary


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict any machine loads: a GPU run's components also open on a CPU-only one."""
    return {name: tensor.cpu() for name, tensor in module.state_dict().items()}


def build_components(config, train, progress: bool = True) -> dict:
    """Train (or load) the tokenizer and CLIP of a RunConfig and build the vocabulary; a saveable dict."""
    torch.manual_seed(config.training.seed)
    if config.vq_checkpoint:
        tokenizer = load_taming_checkpoint(config.vq_checkpoint, config.vq)
    else:
        tokenizer = VQGAN(config.vq)
        train_image_tokenizer(tokenizer, train.images, config.vq_training, progress=progress)
    if config.clip_model:
        encoder = MixedModalEncoder.from_pretrained(config.clip_model, config.clip_checkpoint)
    else:
        encoder = MixedModalEncoder(build_small_clip(config.clip))
        train_clip(encoder, train.images, train.captions, config.clip_training, progress=progress)
    vocabulary = CM3Vocabulary.from_corpus(train.captions, config.vq.codebook_size,
                                           config.text_vocabulary_size)
    return {"vq": cpu_state(tokenizer), "clip": None if config.clip_model else cpu_state(encoder.clip),
            "vocabulary": vocabulary.to_json()}


def load_components(path: str) -> dict:
    """components.pt, or an error that names the file and what to do."""
    try:
        components = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not an RA-CM3 run directory") from None
    except Exception as error:  # a cut or foreign file: RuntimeError, EOFError, UnpicklingError...
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); delete it and rerun "
                         "`mkfast train racm3` to rebuild it") from None
    if not isinstance(components, dict) or not {"vq", "clip", "vocabulary"} <= set(components):
        raise ValueError(f"{path} is not an RA-CM3 components file (expected vq, clip and vocabulary)")
    return components


def restore_components(config, components: dict):
    """(tokenizer, encoder, vocabulary) of a RunConfig from the dict :func:`build_components` made."""
    tokenizer = VQGAN(config.vq)
    tokenizer.load_state_dict(components["vq"])
    if config.clip_model:
        encoder = MixedModalEncoder.from_pretrained(config.clip_model, config.clip_checkpoint)
    else:
        encoder = MixedModalEncoder(build_small_clip(config.clip))
        encoder.clip.load_state_dict(components["clip"])
    return tokenizer.eval(), encoder.eval(), CM3Vocabulary.from_json(components["vocabulary"])
