"""RA-CM3 inference tasks (RA-CM3 "Inference"): text-to-image, image-to-text, infilling, k-shot
classification.

Every task builds a CM3 prompt the way training saw sequences (retrieval.py's
``collate``): ``</doc> m_1 </doc> .. m_K </doc> x``, where m_i are retrieved
(or hand-given) in-context documents and x the task's partial document:

- text-to-image:  x = ``<img alt= caption src=`` -> exactly grid codes and ``>`` (constrained),
  N samples reranked by CLIP score against the caption (RA-CM3 samples 10, keeps the best);
- image-to-text:  x = ``<img alt= <mask:0> src= [codes] > <infill> <mask:0>`` -> a caption up
  to ``</doc>``; M samples, the lowest-perplexity one kept (RA-CM3 samples 32);
- infilling:      x = ``<img alt= text src= [codes, masked runs -> <mask:i>]> <infill>``, then
  per span ``<mask:i>`` and exactly its length of image codes, pasted back;
- k-shot classification with nonsense labels: one demonstration per label in each of
  k one-shot prompts, the label probabilities averaged (RA-CM3's ensemble), or all 2k
  demonstrations in one prompt (the plain k-shot variant).

Retrieval at inference uses clean queries (no query dropout) and the 0.9
diversity filter, through ``RetrievalCorpus.retrieve`` (topk_dedup).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mkfast.racm3.documents import Document, format_document
from mkfast.racm3.metrics import clip_scores, continuation_log_probabilities, perplexity
from mkfast.racm3.retrieval import RETRIEVAL_THRESHOLD, RetrievalCorpus, SequenceOptions
from mkfast.racm3.sampling import DecodingStream, ImageCodeConstraint, SamplingOptions, generate, sample_next
from mkfast.racm3.vocabulary import IMAGE_CLOSE, IMAGE_OPEN, IMAGE_SOURCE, NUM_MASK_SENTINELS

# RA-CM3: 10 images per caption (256 for showcase figures), 32 captions per image.
DEFAULT_IMAGE_SAMPLES = 10
DEFAULT_CAPTION_SAMPLES = 32
DEFAULT_RETRIEVED = 2
# Captions of the demo are 4-8 BPE tokens; 32 leaves room for real captions' first clause.
DEFAULT_MAX_CAPTION_TOKENS = 32
# RA-CM3 uses "animal X" / "animal Y"; on the digits the nonsense label sits where a digit name would.
NONSENSE_LABELS = ("a handwritten digit X", "a handwritten digit Y")


@dataclass
class TextToImageResult:
    """images: (N, 3, H, W) in [0, 1], codes: (N, r, r), scores: (N,) CLIP scores; all sorted best first."""

    caption: str
    retrieved: list[int]
    images: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor


@dataclass
class ImageToTextResult:
    """caption: the lowest-perplexity candidate; candidates sorted by perplexity (lowest first)."""

    caption: str
    retrieved: list[int]
    candidates: list[str]
    perplexities: list[float]


@dataclass
class ClassificationResult:
    """probabilities: (2,) of the labels; per_prompt: (P, 2), one row per prompt (P = 1 for a single
    prompt)."""

    probabilities: torch.Tensor
    per_prompt: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2))

    @property
    def prediction(self) -> int:
        return int(self.probabilities.argmax())


class RACM3Inference:
    """The trained pieces together: generator, corpus (vocabulary, encoder, memory, documents), VQ
    tokenizer."""

    def __init__(self, model, corpus: RetrievalCorpus, image_tokenizer,
                 threshold: float = RETRIEVAL_THRESHOLD):
        self.model, self.corpus, self.image_tokenizer = model.eval(), corpus, image_tokenizer
        self.vocabulary, self.encoder = corpus.vocabulary, corpus.encoder
        self.threshold = threshold
        self.codes_per_side = int(corpus.codes.shape[-1])
        self.codes_per_image = self.codes_per_side * int(corpus.codes.shape[-2])
        special = self.vocabulary.special_ids
        self.open_id, self.source_id, self.close_id = (special[IMAGE_OPEN], special[IMAGE_SOURCE],
                                                       special[IMAGE_CLOSE])

    # ------------------------------------------------------------------ prompts and retrieval
    def retrieve(self, texts: list[str] | None = None, images: torch.Tensor | None = None, k: int = 2,
                 ) -> list[list[int]]:
        """Memory rows for text queries (texts) or image queries (images (B, 3, H, W)); clean queries."""
        count = len(texts) if texts is not None else images.shape[0]
        if k == 0:
            return [[] for _ in range(count)]
        options = SequenceOptions(max_retrieved=k, query_dropout=0.0, threshold=self.threshold)
        part = "text" if texts is not None else "image"
        return self.corpus.retrieve(texts if texts is not None else [""] * count, images, [part] * count,
                                    [k] * count, options, torch.Generator().manual_seed(0))

    def context_ids(self, documents: list[Document]) -> list[int]:
        """``</doc> m_1 </doc> .. m_K </doc>``: what precedes the task's document (as in training)."""
        ids = [self.vocabulary.separator_id]
        for document in documents:
            ids += document.token_ids.tolist() + [self.vocabulary.separator_id]
        return ids

    def _context(self, rows: list[int] | None, documents: list[Document] | None) -> list[int]:
        given = list(documents or []) + [self.corpus.documents[row] for row in rows or []]
        return self.context_ids(given)

    def _infill_caption_prefix(self, codes: torch.Tensor) -> list[int]:
        """``<img alt= <mask:0> src= [codes] > <infill> <mask:0>``: the caption is the span to generate."""
        mask = self.vocabulary.mask_id(0)
        return [self.open_id, mask, self.source_id, *self.vocabulary.encode_image(codes), self.close_id,
                self.vocabulary.infill_id, mask]

    def _text_ids_allowed(self) -> torch.Tensor:
        allowed = torch.zeros(len(self.vocabulary), dtype=torch.bool)
        allowed[self.vocabulary.text_offset:self.vocabulary.image_offset] = True
        allowed[self.vocabulary.separator_id] = True  # ends the caption span
        return allowed

    # ------------------------------------------------------------------ text-to-image
    @torch.no_grad()
    def text_to_image(self, caption: str, k: int = DEFAULT_RETRIEVED,
                      num_samples: int = DEFAULT_IMAGE_SAMPLES, options: SamplingOptions | None = None,
                      seed: int = 0, guidance_scale: float = 1.0,
                      context_documents: list[Document] | None = None,
                      use_cache: bool = True) -> TextToImageResult:
        """Retrieve k documents by the caption, sample ``num_samples`` images, rerank by CLIP score."""
        rows = [] if context_documents is not None else self.retrieve(texts=[caption], k=k)[0]
        context = self._context(rows, context_documents)
        prompt = context + [self.open_id, *self.vocabulary.encode_text(caption), self.source_id]
        prompt_ids = torch.tensor(prompt).unsqueeze(0).expand(num_samples, -1)
        unconditional = None
        if guidance_scale != 1.0:
            # The unconditioned stream sees neither caption nor retrieved documents.
            unconditional = torch.tensor([self.vocabulary.separator_id, self.open_id, self.source_id]
                                         ).unsqueeze(0).expand(num_samples, -1)
        tokens = generate(self.model, prompt_ids, self.codes_per_image, options, seed=seed,
                          constraint=ImageCodeConstraint(self.vocabulary, self.codes_per_image),
                          unconditional_prompt_ids=unconditional, guidance_scale=guidance_scale,
                          use_cache=use_cache).cpu()
        codes = (tokens - self.vocabulary.image_offset).view(num_samples, -1, self.codes_per_side)
        images = self.image_tokenizer.decode(codes.to(next(self.image_tokenizer.parameters()).device)).cpu()
        scores = clip_scores(self.encoder, images, [caption] * num_samples)
        order = torch.argsort(scores, descending=True, stable=True)
        return TextToImageResult(caption, rows, images[order], codes[order], scores[order])

    # ------------------------------------------------------------------ image-to-text
    def rerank_captions(self, codes: torch.Tensor, candidates: list[str], context: list[int] | None = None,
                        ) -> tuple[list[str], list[float]]:
        """Candidates sorted by perplexity of ``caption </doc>`` after the infilling prompt (lowest
        first)."""
        separator = self.vocabulary.separator_id
        prefix = torch.tensor((context or [separator]) + self._infill_caption_prefix(codes))
        continuations = [self.vocabulary.encode_text(text) + [separator] for text in candidates]
        values = [perplexity(values)
                  for values in continuation_log_probabilities(self.model, prefix, continuations)]
        order = sorted(range(len(candidates)), key=lambda index: values[index])
        return [candidates[index] for index in order], [values[index] for index in order]

    @torch.no_grad()
    def image_to_text(self, image: torch.Tensor, k: int = DEFAULT_RETRIEVED,
                      num_captions: int = DEFAULT_CAPTION_SAMPLES, options: SamplingOptions | None = None,
                      seed: int = 0, max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS,
                      context_documents: list[Document] | None = None) -> ImageToTextResult:
        """image (3, H, W) in [0, 1] -> the lowest-perplexity of ``num_captions`` sampled captions."""
        rows = [] if context_documents is not None else self.retrieve(images=image.unsqueeze(0), k=k)[0]
        context = self._context(rows, context_documents)
        tokenizer_device = next(self.image_tokenizer.parameters()).device
        codes = self.image_tokenizer.encode(image.unsqueeze(0).to(tokenizer_device))[0]
        prompt_ids = torch.tensor(context + self._infill_caption_prefix(codes.cpu())).unsqueeze(0)
        tokens = generate(self.model, prompt_ids.expand(num_captions, -1), max_caption_tokens, options,
                          seed=seed, allowed=self._text_ids_allowed(),
                          stop_token_id=self.vocabulary.separator_id,
                          pad_token_id=self.vocabulary.pad_id, min_new_tokens=1).cpu()
        candidates = list(dict.fromkeys(self.vocabulary.decode_text(row.tolist()) for row in tokens))
        ranked, values = self.rerank_captions(codes.cpu(), candidates, context)
        return ImageToTextResult(ranked[0], rows, ranked, values)

    # ------------------------------------------------------------------ infilling / editing
    @torch.no_grad()
    def infill_image(self, codes: torch.Tensor, region: torch.Tensor, text: str | None = None,
                     k: int = DEFAULT_RETRIEVED, context_documents: list[Document] | None = None,
                     num_samples: int = 1, options: SamplingOptions | None = None, seed: int = 0,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Regenerate the codes under ``region`` (r, r) bool of ``codes`` (r, r) -> (codes (N, r, r), images).

        Each run of masked positions in raster order becomes one ``<mask:i>`` span
        (at most NUM_MASK_SENTINELS runs). In-context documents: ``context_documents``
        given by hand (controllable generation), else k retrieved by the text, or by
        the image when there is no text.
        """
        if region.shape != codes.shape or region.dtype != torch.bool:
            raise ValueError("infill_image: region must be a bool mask shaped like codes "
                             f"{tuple(codes.shape)}, got {tuple(region.shape)} {region.dtype}")
        spans = _masked_runs(region.reshape(-1))
        if not 1 <= len(spans) <= NUM_MASK_SENTINELS:
            raise ValueError(f"infill_image: region must form 1..{NUM_MASK_SENTINELS} runs in raster order, "
                             f"got {len(spans)}")
        if context_documents is None and k > 0:
            rows = (self.retrieve(texts=[text], k=k) if text is not None else
                    self.retrieve(images=self.image_tokenizer.decode(codes.unsqueeze(0)).cpu(), k=k))[0]
        else:
            rows = []
        image_ids = self.vocabulary.encode_image(codes)
        body, position = [], 0
        for index, (start, end) in enumerate(spans):
            body += image_ids[position:start] + [self.vocabulary.mask_id(index)]
            position = end
        body += image_ids[position:]
        caption_ids = self.vocabulary.encode_text(text) if text is not None else []
        head = [self.open_id] + caption_ids + [self.source_id]
        prompt = (self._context(rows, context_documents) + head + body
                  + [self.close_id, self.vocabulary.infill_id])
        stream = DecodingStream(self.model, torch.tensor(prompt).unsqueeze(0).expand(num_samples, -1))
        generator = torch.Generator(device=stream.device).manual_seed(seed)
        image_only = torch.arange(len(self.vocabulary), device=stream.device) >= self.vocabulary.image_offset
        options = options or SamplingOptions()
        filled = codes.reshape(1, -1).repeat(num_samples, 1)
        for index, (start, end) in enumerate(spans):
            logits = stream.append(torch.full((num_samples,), self.vocabulary.mask_id(index)))
            for position in range(start, end):
                token = sample_next(logits, options, generator, image_only.expand(num_samples, -1))
                filled[:, position] = token.cpu() - self.vocabulary.image_offset
                if not (index == len(spans) - 1 and position == end - 1):
                    logits = stream.append(token)
        filled = filled.view(num_samples, *codes.shape)
        return filled, self.image_tokenizer.decode(filled.to(codes.device)).cpu()

    # ------------------------------------------------------------------ k-shot classification
    def demonstration(self, codes: torch.Tensor, label: str) -> Document:
        return format_document(self.vocabulary, label, codes)

    @torch.no_grad()
    def label_probabilities(self, query_codes: torch.Tensor, demonstrations: list[Document],
                            labels: tuple[str, str] = NONSENSE_LABELS) -> torch.Tensor:
        """One prompt: (2,) p(label) normalised over the labels; p(label) = p(label text ``</doc>`` |
        prompt)."""
        prefix = torch.tensor(self.context_ids(demonstrations) + self._infill_caption_prefix(query_codes))
        continuations = [self.vocabulary.encode_text(label) + [self.vocabulary.separator_id]
                         for label in labels]
        log_likelihoods = torch.stack([values.double().sum() for values in
                                       continuation_log_probabilities(self.model, prefix, continuations)])
        return torch.softmax(log_likelihoods, dim=0)

    def classify_ensemble(self, query_codes: torch.Tensor,
                          demonstration_pairs: list[tuple[Document, Document]],
                          labels: tuple[str, str] = NONSENSE_LABELS) -> ClassificationResult:
        """RA-CM3's k-shot: k one-shot prompts (one demonstration per label each), probabilities averaged."""
        if not demonstration_pairs:
            raise ValueError("classify_ensemble: need at least one pair of demonstrations")
        per_prompt = torch.stack([self.label_probabilities(query_codes, list(pair), labels)
                                  for pair in demonstration_pairs])
        return ClassificationResult(per_prompt.mean(dim=0), per_prompt)

    def classify_single_prompt(self, query_codes: torch.Tensor, demonstrations: list[Document],
                               labels: tuple[str, str] = NONSENSE_LABELS) -> ClassificationResult:
        """The plain k-shot variant: all demonstrations in one prompt."""
        probabilities = self.label_probabilities(query_codes, demonstrations, labels)
        return ClassificationResult(probabilities, probabilities.unsqueeze(0))


def _masked_runs(flat_region: torch.Tensor) -> list[tuple[int, int]]:
    """(n,) bool -> [(start, end)] of its True runs."""
    runs, start = [], None
    for position, masked in enumerate(flat_region.tolist() + [False]):
        if masked and start is None:
            start = position
        elif not masked and start is not None:
            runs.append((start, position))
            start = None
    return runs


def save_images(images: torch.Tensor, directory: str, prefix: str) -> list[str]:
    """(N, 3, H, W) in [0, 1] -> N PNG files ``prefix_<i>.png`` in directory; returns their paths."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = os.path.join(directory, f"{prefix}_{index}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
