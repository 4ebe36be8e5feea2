"""RA-CM3 evaluation metrics: FID, CLIP score, CIDEr-D, perplexity, accuracy.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to
  features of real and generated images. The paper's number uses Inception-v3
  pool features, whose weights cannot be downloaded here, so the extractor is
  pluggable (:class:`FeatureExtractor`) and every result names the one it used.
  :class:`CLIPImageFeatures` (the retriever's image tower) is the one the demo
  uses; a user with an Inception checkpoint passes their own callable.
- CLIP score (Hessel et al. 2021, torchmetrics' convention): 100 * max(cos(E_image, E_text), 0)
  with the MixedModalEncoder's towers; RA-CM3 reranks sampled images with it.
- CIDEr-D (Vedantam et al. 2015) as the coco-caption code computes it: n-grams
  1..4, tf-idf with document frequencies over the references, clipped
  cosine similarity, Gaussian length penalty sigma = 6, mean over n, mean over
  the references, x10. Python only (no Java tokenizer: lower-case + punctuation strip).
- perplexity: exp(mean negative log-likelihood of target tokens).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

CIDER_MAX_N = 4
CIDER_SIGMA = 6.0  # coco-caption's CIDEr-D length-penalty width
CIDER_SCALE = 10.0  # coco-caption multiplies by 10 so scores look like BLEU's range x 10
CLIP_SCORE_WEIGHT = 100.0  # torchmetrics' CLIPScore scale


# ----------------------------------------------------------------------------- FID
class FeatureExtractor(Protocol):
    """images (N, 3, H, W) in [0, 1] -> features (N, d); ``name`` is reported with every FID."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class CLIPImageFeatures:
    """The MixedModalEncoder's image tower (unit-norm embeddings) as the FID feature extractor."""

    def __init__(self, encoder, name: str = "mixed-modal CLIP image tower"):
        self.encoder, self.name = encoder, name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_images(images).double().cpu()


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) -> mean (d,), unbiased covariance (d, d), float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_statistics: features must be (N >= 2, d), got {tuple(features.shape)}")
    features = features.double()
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor,
                     covariance_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)); the inner matrix is
    symmetric PSD, so eigh gives it without scipy's complex sqrtm.
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    root_a = _symmetric_sqrt(covariance_a)
    inner = root_a @ covariance_b @ root_a
    trace_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_root
    return float(distance)


def fid(real_images: torch.Tensor, generated_images: torch.Tensor, extractor: FeatureExtractor,
        batch_size: int = 256) -> dict:
    """FID between two image sets (N, 3, H, W) in [0, 1].

    Returns {"fid", "extractor", "real", "generated"}.
    """
    features = []
    for images in (real_images, generated_images):
        chunks = [extractor(images[start:start + batch_size])
                  for start in range(0, images.shape[0], batch_size)]
        features.append(torch.cat(chunks))
    value = frechet_distance(*gaussian_statistics(features[0]), *gaussian_statistics(features[1]))
    return {"fid": value, "extractor": getattr(extractor, "name", type(extractor).__name__),
            "real": int(real_images.shape[0]), "generated": int(generated_images.shape[0])}


# ----------------------------------------------------------------------------- CLIP score
@torch.no_grad()
def clip_scores(encoder, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(N, 3, H, W) images and N texts -> (N,) 100 * max(cos, 0) per pair (fp32, CPU)."""
    if images.shape[0] != len(texts):
        raise ValueError(f"clip_scores: {images.shape[0]} images but {len(texts)} texts")
    image_embeddings = F.normalize(encoder.encode_images(images).float(), dim=-1)
    text_embeddings = F.normalize(encoder.encode_texts(texts).float(), dim=-1)
    cosine = (image_embeddings * text_embeddings).sum(dim=-1)
    return (CLIP_SCORE_WEIGHT * cosine.clamp(min=0)).cpu()


# ----------------------------------------------------------------------------- CIDEr-D
def normalise_caption(text: str) -> str:
    """Lower-case, punctuation stripped, single spaces (stands in for coco-caption's PTB tokenizer)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _ngram_counts(text: str, max_n: int = CIDER_MAX_N) -> Counter:
    words = normalise_caption(text).split()
    return Counter(tuple(words[start:start + n])
                   for n in range(1, max_n + 1) for start in range(len(words) - n + 1))


@dataclass
class _Vector:
    weights: list[dict]
    norms: list[float]
    length: int


def _tf_idf(counts: Counter, document_frequency: Counter, log_reference_count: float, max_n: int) -> _Vector:
    weights: list[dict] = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        # An n-gram absent from every reference gets df 1 (coco-caption's max(1, df)).
        weight = term_frequency * (log_reference_count - math.log(max(1.0, document_frequency[ngram])))
        weights[order][ngram] = weight
        norms[order] += weight * weight
        # coco-caption counts the length on order index 1 (bigrams), kept for comparability.
        if order == 1:
            length += term_frequency
    return _Vector(weights, [math.sqrt(norm) for norm in norms], length)


def _similarity(hypothesis: _Vector, reference: _Vector, max_n: int, sigma: float) -> list[float]:
    delta = hypothesis.length - reference.length
    penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
    values = []
    for order in range(max_n):
        value = sum(min(weight, reference.weights[order].get(ngram, 0.0))
                    * reference.weights[order].get(ngram, 0.0)
                    for ngram, weight in hypothesis.weights[order].items())
        if hypothesis.norms[order] != 0 and reference.norms[order] != 0:
            value /= hypothesis.norms[order] * reference.norms[order]
        values.append(value * penalty)
    return values


def cider_d(hypotheses: list[str], references: list[list[str]], max_n: int = CIDER_MAX_N,
            sigma: float = CIDER_SIGMA) -> tuple[float, list[float]]:
    """CIDEr-D of one hypothesis per image against that image's references -> (corpus mean,
    per-image scores).

    Document frequencies come from the references of all images (the corpus),
    so scores depend on the whole evaluation set, as in coco-caption.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"cider_d: need one hypothesis per image and at least one image, got "
                         f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    reference_counts = [[_ngram_counts(reference, max_n) for reference in image] for image in references]
    document_frequency = Counter()
    for image in reference_counts:
        document_frequency.update({ngram for counts in image for ngram in counts})
    log_reference_count = math.log(float(len(references)))
    scores = []
    for hypothesis, image in zip(hypotheses, reference_counts, strict=True):
        if not image:
            raise ValueError("cider_d: every image needs at least one reference")
        vector = _tf_idf(_ngram_counts(hypothesis, max_n), document_frequency, log_reference_count, max_n)
        total = [0.0] * max_n
        for counts in image:
            reference = _tf_idf(counts, document_frequency, log_reference_count, max_n)
            total = [a + b for a, b in zip(total, _similarity(vector, reference, max_n, sigma), strict=True)]
        scores.append(CIDER_SCALE * (sum(total) / max_n) / len(image))
    return sum(scores) / len(scores), scores


# ----------------------------------------------------------------------------- likelihoods
@torch.no_grad()
def continuation_log_probabilities(model, prefix_ids: torch.Tensor, continuations: list[list[int]],
                                   batch_size: int = 32) -> list[torch.Tensor]:
    """log p(continuation token t | prefix, earlier continuation tokens) per continuation.

    prefix_ids: (T,) or (B, T) (one prefix per continuation); continuations: B lists of ids.
    Returns B tensors (len(continuation_b),) fp32. Rows are right-padded, so no
    attention mask is needed: a causal model never looks at later (padding) positions.
    """
    device = next(model.parameters()).device
    if prefix_ids.dim() == 1:
        prefix_ids = prefix_ids.unsqueeze(0).expand(len(continuations), -1)
    if prefix_ids.shape[0] != len(continuations):
        raise ValueError(f"continuation_log_probabilities: {prefix_ids.shape[0]} prefixes for "
                         f"{len(continuations)} continuations")
    prefix_length = prefix_ids.shape[1]
    results: list[torch.Tensor] = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start:start + batch_size]
        longest = max(len(ids) for ids in chunk)
        if longest == 0:
            results.extend(torch.zeros(0) for _ in chunk)
            continue
        padded = torch.zeros(len(chunk), longest, dtype=torch.int64)
        for row, ids in enumerate(chunk):
            padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        input_ids = torch.cat([prefix_ids[start:start + len(chunk)].cpu(), padded], dim=1).to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits[:, prefix_length - 1:-1].float()
        log_probabilities = torch.log_softmax(logits, dim=-1)
        log_probabilities = log_probabilities.gather(-1, padded.to(device).unsqueeze(-1)).squeeze(-1)
        results.extend(log_probabilities[row, :len(ids)].cpu() for row, ids in enumerate(chunk))
    return results


def perplexity(log_probabilities: torch.Tensor) -> float:
    """exp(-mean log p) over a sequence's target tokens (inf for an empty sequence)."""
    if log_probabilities.numel() == 0:
        return float("inf")
    return float(torch.exp(-log_probabilities.double().mean()))


def accuracy(predictions, targets) -> float:
    """Fraction of equal pairs (any comparable items); 0 pairs -> nan."""
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(targets)} targets")
    if not predictions:
        return float("nan")
    matches = sum(int(prediction == target)
                  for prediction, target in zip(predictions, targets, strict=True))
    return matches / len(predictions)


