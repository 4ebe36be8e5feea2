"""Mixed-modal CLIP encoder: RA-CM3's mean of normalised parts, single-part documents, query dropout."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from mkfast.racm3.encoder import (
    CLIPTrainingConfig,
    MixedModalEncoder,
    SmallCLIPConfig,
    build_small_clip,
    drop_image_patches,
    drop_text_tokens,
    train_clip,
)

TEXTS = ["a handwritten digit seven", "a photo of a cat", "two dogs"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return MixedModalEncoder(build_small_clip(SmallCLIPConfig(image_size=16, patch_size=8))).eval()


def test_document_embedding_is_renormalised_mean_of_normalised_parts(encoder):
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        raw_text = encoder.clip.encode_text(encoder.tokenize(TEXTS))
        raw_image = encoder.clip.encode_image(encoder.prepare_images(images))
    expected = F.normalize(F.normalize(raw_text, dim=-1) + F.normalize(raw_image, dim=-1), dim=-1)
    documents = encoder.encode_documents(TEXTS, images)
    assert_close(documents, expected, dtype=torch.float32)
    assert_close(documents.norm(dim=-1), torch.ones(3), dtype=torch.float32)
    # Not just the text or just the image embedding.
    assert not torch.allclose(documents, F.normalize(raw_text, dim=-1), atol=1e-3)


def test_single_part_documents_use_their_one_part(encoder):
    images = torch.rand(3, 3, 16, 16)
    assert_close(encoder.encode_documents(texts=TEXTS), encoder.encode_texts(TEXTS), dtype=torch.float32)
    assert_close(encoder.encode_documents(images=images), encoder.encode_images(images), dtype=torch.float32)
    mixed = encoder.encode_documents([TEXTS[0], None, TEXTS[2]], images)
    both = encoder.encode_documents(TEXTS, images)
    assert_close(mixed[1], encoder.encode_images(images[1:2])[0], dtype=torch.float32)
    assert_close(mixed[[0, 2]], both[[0, 2]], dtype=torch.float32)


def test_images_of_another_size_are_resized(encoder):
    assert encoder.encode_images(torch.rand(2, 3, 24, 24)).shape == (2, encoder.embed_dim)


def test_mismatched_counts_are_refused(encoder):
    with pytest.raises(ValueError, match="2 images"):
        encoder.encode_documents(TEXTS, torch.rand(2, 3, 16, 16))


def test_text_query_dropout_keeps_start_end_and_drops_about_a_fifth():
    token_ids = torch.zeros(200, 40, dtype=torch.int64)
    token_ids[:, 0], token_ids[:, 1:31], token_ids[:, 31] = 49406, torch.arange(1, 31), 49407
    dropped = drop_text_tokens(token_ids, 0.2, torch.Generator().manual_seed(0))
    lengths = (dropped != 0).sum(dim=1)
    assert bool((dropped[:, 0] == 49406).all())
    assert bool((dropped[torch.arange(200), lengths - 1] == 49407).all())
    kept_words = (lengths - 2).float().mean().item()
    assert 22 < kept_words < 26  # 30 words, 20% dropped -> 24 kept on average
    # Kept words stay in order.
    row = dropped[0, 1:lengths[0] - 1]
    assert bool((row[1:] > row[:-1]).all())
    single = torch.tensor([[49406, 5, 49407, 0]])
    assert drop_text_tokens(single, 0.99, torch.Generator().manual_seed(0)).tolist() == single.tolist()


def test_image_query_dropout_blanks_whole_patches():
    pixels = torch.ones(64, 3, 32, 32)
    dropped = drop_image_patches(pixels, 8, 0.2, torch.Generator().manual_seed(0))
    patches = dropped.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, 4, 4, 8, 8)
    per_patch = patches.sum(dim=(1, 4, 5))
    assert bool(((per_patch == 0) | (per_patch == 3 * 64)).all())
    assert 0.15 < (per_patch == 0).float().mean().item() < 0.25


def test_clip_training_lowers_contrastive_loss():
    torch.manual_seed(0)
    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(image_size=16, patch_size=8)))
    images = torch.zeros(8, 3, 16, 16)
    for index in range(8):
        images[index, :, index * 2:index * 2 + 2, :] = 1.0
    texts = [f"bar {word}" for word in ["zero", "one", "two", "three", "four", "five", "six", "seven"]]
    losses = train_clip(encoder, images, texts,
                        CLIPTrainingConfig(steps=25, batch_size=8, learning_rate=3e-3))
    # Batches are drawn with replacement (repeated pairs), so the floor is above 0.
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
