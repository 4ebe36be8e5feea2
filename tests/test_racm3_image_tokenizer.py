"""VQGAN image tokenizer: shapes, code round trip, taming checkpoint loading, a short training run."""

import pytest
import torch
from helpers import assert_close

from mkfast.racm3.image_tokenizer import (
    VQGAN,
    VQGANConfig,
    VQTrainingConfig,
    load_taming_checkpoint,
    mkfast_to_taming_state_dict,
    train_image_tokenizer,
)

# 16x16 images, two levels (one downsample) -> 8x8 codes; attention at 8 exercises AttnBlock in both towers.
SMALL = VQGANConfig(resolution=16, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                    attention_resolutions=(8,), z_channels=32, embedding_dim=16, codebook_size=24)


def test_default_config_is_rac_m3s_256_to_32x32_with_8192_codes():
    config = VQGANConfig()
    assert config.codes_per_side == 32 and config.codebook_size == 8192


def test_shapes_and_decode_of_encode_equals_forward_reconstruction():
    torch.manual_seed(0)
    model = VQGAN(SMALL).eval()
    images = torch.rand(3, 3, 16, 16)
    codes = model.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.codebook_size
    with torch.no_grad():
        reconstruction, forward_codes, _ = model(images)
    assert torch.equal(forward_codes.long(), codes)
    assert_close(model.decode(codes), reconstruction.clamp(0, 1), dtype=torch.float32)

    # Encoding is deterministic (eval mode: no EMA codebook update).
    assert torch.equal(model.encode(images), codes)


@pytest.mark.cuda
def test_a_gpu_tokenizer_takes_and_returns_tensors_on_the_callers_device():
    torch.manual_seed(0)
    model = VQGAN(SMALL).eval()
    images = torch.rand(3, 3, 16, 16)
    cpu_codes = model.encode(images)
    model = model.cuda()
    codes = model.encode(images)
    assert codes.device.type == "cpu"
    # Codes are an argmin: a distance tie broken differently on the GPU may flip one.
    assert (codes == cpu_codes).float().mean() > 0.95
    assert model.decode(codes).device.type == "cpu" and model.decode(codes.cuda()).device.type == "cuda"
    # CPU images, GPU model.
    train_image_tokenizer(model.train(), images, VQTrainingConfig(steps=2, batch_size=2))


def _taming_keys_for_small_config() -> set[str]:
    """Key names a taming-transformers VQModel with SMALL's ddconfig has (written out from taming's
    modules)."""
    return {
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.1.attn.0.q.weight",
        "encoder.down.1.attn.0.proj_out.bias", "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.k.weight", "encoder.mid.block_2.norm2.weight", "encoder.norm_out.weight",
        "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.mid.attn_1.v.bias",
        "decoder.up.1.block.0.conv1.weight", "decoder.up.1.block.1.conv2.weight",
        "decoder.up.1.attn.1.q.weight", "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.norm_out.bias", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.bias",
        "quantize.embedding.weight",
    }


def test_taming_checkpoint_loads_with_key_mapping(tmp_path):
    torch.manual_seed(1)
    source = VQGAN(SMALL).eval()
    taming_state = mkfast_to_taming_state_dict(source.state_dict())
    assert _taming_keys_for_small_config() <= set(taming_state)
    assert taming_state["quantize.embedding.weight"].shape == (SMALL.codebook_size, SMALL.embedding_dim)
    # What a Lightning checkpoint of taming holds besides the model: loss modules, optimizer epochs.
    taming_state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    taming_state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(2)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": taming_state, "epoch": 3}, path)
    loaded = load_taming_checkpoint(str(path), SMALL).eval()
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), source.encode(images))
    codes = source.encode(images)
    assert_close(loaded.decode(codes), source.decode(codes), dtype=torch.float32)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    other = VQGANConfig(**{**SMALL.__dict__, "num_res_blocks": 2})
    path = tmp_path / "other.ckpt"
    torch.save(mkfast_to_taming_state_dict(VQGAN(other).state_dict()), path)
    with pytest.raises(ValueError, match="does not match"):
        load_taming_checkpoint(str(path), SMALL)


@pytest.mark.slow
def test_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    # Structured images (bars) so that there is something to learn in a few steps.
    images = torch.zeros(32, 3, 16, 16)
    for index in range(32):
        images[index, :, :, index % 16] = 1.0
    model = VQGAN(SMALL)
    losses = train_image_tokenizer(model, images,
                                   VQTrainingConfig(steps=30, batch_size=8, learning_rate=2e-3))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
