"""RA-CM3 metrics: CIDEr-D on hand-computed examples, FID on known Gaussians, CLIP score, perplexity,
accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mkfast.racm3.metrics import (
    accuracy,
    cider_d,
    clip_scores,
    continuation_log_probabilities,
    fid,
    frechet_distance,
    gaussian_statistics,
    normalise_caption,
    perplexity,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread buys nothing, and on a busy 2-core machine thread
    oversubscription made a decode step 57x slower (1.4 ms -> 80 ms, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- CIDEr-D
def test_cider_d_matches_a_hand_computed_two_image_corpus():
    # References: image 0 "a cat", image 1 "a dog"; log(#images) = log 2.
    # df: "a" 2, "cat" 1, "dog" 1, "a cat" 1, "a dog" 1 -> idf weight log2 - log(df).
    # Image 0, hypothesis "a cat": unigram vector {a: 0, cat: log2}, bigram {a cat: log2};
    #   identical to its reference -> cosine 1 for n = 1, 2; 0 for n = 3, 4 (no n-grams);
    #   mean over n = 0.5, one reference, x10 -> 5.
    # Image 1, hypothesis "a cat" vs "a dog": "a" has weight 0, nothing else shared -> 0.
    mean, scores = cider_d(["a cat", "a cat"], [["a cat"], ["a dog"]])
    assert scores == pytest.approx([5.0, 0.0])
    assert mean == pytest.approx(2.5)


def test_cider_d_clips_and_penalises_length_like_coco_caption():
    # Hypothesis "a cat sat" for image 0: unigrams {a: 0, cat: log2, sat: log2 (df 0 -> 1)},
    # norm sqrt2 log2; its reference {cat: log2}, norm log2 -> cosine 1/sqrt2. Bigrams
    # {a cat: log2, cat sat: log2} vs {a cat: log2} -> 1/sqrt2. Lengths (bigram counts, as
    # coco-caption counts them) 2 vs 1 -> penalty exp(-1 / (2 * 6^2)).
    _, scores = cider_d(["a cat sat", "a dog"], [["a cat"], ["a dog"]])
    expected = 10.0 * (2 / 4) * math.exp(-1 / 72) / math.sqrt(2)
    assert scores[0] == pytest.approx(expected)
    # Clipping: repeating a matching word cannot raise the numerator above the reference's weight.
    _, repeated = cider_d(["cat cat cat cat", "a dog"], [["a cat"], ["a dog"]])
    assert repeated[0] < scores[0]


def test_cider_d_averages_over_references_and_normalises_text():
    _, one = cider_d(["A cat!", "a dog"], [["a cat"], ["a dog"]])
    _, two = cider_d(["a cat", "a dog"], [["a cat", "a bird"], ["a dog", "a bird"]])
    assert one[0] == pytest.approx(5.0)
    assert normalise_caption("  A  Cat, sat. ") == "a cat sat"
    assert 0.0 < two[0] < 10.0
    with pytest.raises(ValueError, match="hypothesis per image"):
        cider_d(["a"], [["a"], ["b"]])


# ----------------------------------------------------------------------------- FID
def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    variance_a, variance_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = (mean_a - mean_b).square().sum() + (variance_a.sqrt() - variance_b.sqrt()).square().sum()
    value = frechet_distance(mean_a, torch.diag(variance_a), mean_b, torch.diag(variance_b))
    assert value == pytest.approx(float(expected), abs=1e-9)


def test_frechet_distance_is_invariant_to_a_shared_rotation():
    generator = torch.Generator().manual_seed(0)
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    factor_a, factor_b = draw(4, 4), draw(4, 4)
    covariance_a, covariance_b = factor_a @ factor_a.T, factor_b @ factor_b.T
    mean_a, mean_b = draw(4), draw(4)
    rotation, _ = torch.linalg.qr(draw(4, 4))
    plain = frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
    rotated = frechet_distance(rotation @ mean_a, rotation @ covariance_a @ rotation.T, rotation @ mean_b,
                               rotation @ covariance_b @ rotation.T)
    assert plain == pytest.approx(rotated, rel=1e-8)
    assert frechet_distance(mean_a, covariance_a, mean_a, covariance_a) == pytest.approx(0.0, abs=1e-8)


class FlattenFeatures:
    """Feature extractor for the test: the first pixels of each image, unchanged."""

    name = "first 3 pixels"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1)[:, :3].double()


def test_fid_from_samples_approaches_the_gaussians_distance():
    generator = torch.Generator().manual_seed(0)
    count = 20_000
    real = torch.randn(count, 3, 1, 1, generator=generator, dtype=torch.float64)
    generated = torch.randn(count, 3, 1, 1, generator=generator, dtype=torch.float64) * 2.0 + 0.5
    result = fid(real, generated, FlattenFeatures(), batch_size=4096)
    # N(0, I) vs N(0.5, 4 I) in 3 dims: 3 * 0.25 + 3 * (1 - 2)^2 = 3.75.
    assert result["fid"] == pytest.approx(3.75, rel=0.05)
    assert result["extractor"] == "first 3 pixels"
    assert result["real"] == result["generated"] == count
    _, covariance = gaussian_statistics(real.reshape(count, 3))
    torch.testing.assert_close(covariance, torch.eye(3, dtype=torch.float64), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- CLIP score
class FixedEncoder:
    """Hands back given embeddings, so the CLIP score's cosine is known."""

    def __init__(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor):
        self.image_embeddings, self.text_embeddings = image_embeddings, text_embeddings

    def encode_images(self, images):
        return self.image_embeddings[: images.shape[0]]

    def encode_texts(self, texts):
        return self.text_embeddings[: len(texts)]


def test_clip_score_is_100_times_the_clamped_cosine():
    angle = torch.tensor(0.3)
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    texts = torch.stack([torch.stack([angle.cos(), angle.sin()]), torch.tensor([-1.0, 0.1]),
                         torch.tensor([5.0, 0.0])])
    scores = clip_scores(FixedEncoder(images, texts), torch.zeros(3, 3, 4, 4), ["x", "y", "z"])
    assert scores.tolist() == pytest.approx([100 * math.cos(0.3), 0.0, 100.0], abs=1e-4)


def test_clip_score_with_a_real_encoder_prefers_the_matching_caption():
    from mkfast.racm3.encoder import MixedModalEncoder, SmallCLIPConfig, build_small_clip

    torch.manual_seed(0)
    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(vision_layers=1, text_layers=1))).eval()
    images = torch.rand(2, 3, 32, 32)
    scores = clip_scores(encoder, images, ["a cat", "a dog"])
    image_embeddings = F.normalize(encoder.encode_images(images), dim=-1)
    text_embeddings = F.normalize(encoder.encode_texts(["a cat", "a dog"]), dim=-1)
    expected = 100 * (image_embeddings * text_embeddings).sum(-1).clamp(min=0)
    torch.testing.assert_close(scores, expected)
    assert bool(((scores >= 0) & (scores <= 100)).all())


# ----------------------------------------------------------------------------- perplexity, accuracy
@pytest.fixture(scope="module")
def tiny_model():
    from mkfast.racm3.generator import GeneratorConfig, build_generator

    torch.manual_seed(0)
    config = GeneratorConfig(hidden_size=32, num_layers=1, num_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_sequence_length=64)
    return build_generator(40, config).eval()


def test_continuation_log_probabilities_match_one_sequence_at_a_time(tiny_model):
    prefix = torch.tensor([1, 5, 7])
    continuations = [[3, 4, 5, 6, 9], [2], [8, 8, 8]]
    batched = continuation_log_probabilities(tiny_model, prefix, continuations, batch_size=2)
    for continuation, values in zip(continuations, batched, strict=True):
        ids = torch.cat([prefix, torch.tensor(continuation)]).unsqueeze(0)
        with torch.no_grad():
            log_probabilities = torch.log_softmax(tiny_model(input_ids=ids).logits[0].float(), dim=-1)
        targets = torch.tensor(continuation)[:, None]
        expected = log_probabilities[len(prefix) - 1:-1].gather(-1, targets).squeeze(-1)
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model):
    import copy

    uniform = copy.deepcopy(tiny_model)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    values = continuation_log_probabilities(uniform, torch.tensor([1, 2]), [[3, 4, 5, 6]])[0]
    assert perplexity(values) == pytest.approx(40.0, rel=1e-5)
    assert perplexity(torch.tensor([math.log(0.5), math.log(0.125)])) == pytest.approx(4.0)
    assert perplexity(torch.zeros(0)) == float("inf")


def test_accuracy_counts_equal_pairs():
    assert accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
