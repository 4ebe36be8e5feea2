"""CM3 documents: the HTML-like format and the causally-masked transform (RA-CM3 "Documents", "Generator").

A document formats as ``<img alt=[text] src=[image]>``; a text-only document is
its text, an image-only one ``<img src=[image]>``. The causally-masked transform
(CM3, Aghajanyan et al. 2022) replaces span(s) by ``<mask:i>`` and moves them to
the end after ``<infill>``:

    x0 .. <mask:0> .. <mask:1> .. <infill> <mask:0> span0 <mask:1> span1

Token ids travel with a part label per token (structure / text / image) so
losses can be reported per modality after the spans have moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkfast.racm3.vocabulary import (
    IMAGE_CLOSE,
    IMAGE_OPEN,
    IMAGE_SOURCE,
    NUM_MASK_SENTINELS,
    PART_IMAGE,
    PART_STRUCTURE,
    PART_TEXT,
    CM3Vocabulary,
)

# CM3 draws the number of spans from Poisson(1) truncated to >= 1; we also cap it.
MEAN_SPANS = 1.0
MAX_SPANS = 4
# Span lengths ~ Poisson(mean) (>= 1). 8 tokens is about one caption, or one row
# of an 8x8 code grid of the demo; with 1024-code images a user raises it.
DEFAULT_MEAN_SPAN_LENGTH = 8.0
# CM3 trains on the plain document half the time and on a masked one otherwise.
DEFAULT_MASK_PROBABILITY = 0.5

assert MAX_SPANS <= NUM_MASK_SENTINELS


@dataclass
class Document:
    """token_ids: (L,) int64 vocabulary ids; parts: (L,) int64 PART_* labels."""

    token_ids: torch.Tensor
    parts: torch.Tensor

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def format_document(vocabulary: CM3Vocabulary, text: str | None = None,
                    image_codes: torch.Tensor | None = None) -> Document:
    """``<img alt=[text] src=[image]>``; a single-part document is its one part (image bracketed)."""
    if text is None and image_codes is None:
        raise ValueError("format_document: a document needs text, image_codes or both")
    special = vocabulary.special_ids
    pieces: list[tuple[list[int], int]] = []
    if image_codes is None:
        pieces.append((vocabulary.encode_text(text), PART_TEXT))
    else:
        if text is not None:
            pieces.append(([special[IMAGE_OPEN]], PART_STRUCTURE))
            pieces.append((vocabulary.encode_text(text), PART_TEXT))
            pieces.append(([special[IMAGE_SOURCE]], PART_STRUCTURE))
        else:
            # "<img src=" as two tokens: the open tag without alt text.
            pieces.append(([special[IMAGE_OPEN], special[IMAGE_SOURCE]], PART_STRUCTURE))
        pieces.append((vocabulary.encode_image(image_codes), PART_IMAGE))
        pieces.append(([special[IMAGE_CLOSE]], PART_STRUCTURE))
    token_ids = [token for tokens, _ in pieces for token in tokens]
    parts = [part for tokens, part in pieces for _ in tokens]
    return Document(torch.tensor(token_ids, dtype=torch.int64), torch.tensor(parts, dtype=torch.int64))


def sample_spans(length: int, generator: torch.Generator, mean_span_length: float = DEFAULT_MEAN_SPAN_LENGTH,
                 ) -> list[tuple[int, int]]:
    """Non-overlapping, non-adjacent (start, end) spans in [0, length), sorted; CM3's Poisson draws."""
    if length < 1:
        return []
    count = int(torch.poisson(torch.tensor(MEAN_SPANS), generator=generator).item())
    count = min(max(count, 1), MAX_SPANS)
    lengths = torch.poisson(torch.full((count,), mean_span_length), generator=generator)
    lengths = lengths.long().clamp(min=1).tolist()
    # Spans are separated by at least one kept token so that un-masking is unambiguous
    # and each sentinel stands for one contiguous piece.
    while count > 1 and sum(lengths) + count - 1 > length - 1:
        lengths.pop()
        count -= 1
    lengths = [min(span, length) for span in lengths]
    free = length - sum(lengths) - (count - 1)
    cuts = torch.randint(0, free + 1, (count,), generator=generator).sort().values.tolist()
    spans, position, previous_cut = [], 0, 0
    for index, (span_length, cut) in enumerate(zip(lengths, cuts, strict=True)):
        position += cut - previous_cut + (1 if index else 0)
        spans.append((position, position + span_length))
        position += span_length
        previous_cut = cut
    return spans


def causally_mask(document: Document, vocabulary: CM3Vocabulary, generator: torch.Generator,
                  mean_span_length: float = DEFAULT_MEAN_SPAN_LENGTH) -> Document:
    """Move Poisson-sampled spans after ``<infill>``, each behind its ``<mask:i>`` sentinel."""
    spans = sample_spans(len(document), generator, mean_span_length)
    token_ids, parts = document.token_ids, document.parts
    body_ids, body_parts, tail_ids, tail_parts = [], [], [], []
    position = 0
    for index, (start, end) in enumerate(spans):
        sentinel = torch.tensor([vocabulary.mask_id(index)])
        structure = torch.tensor([PART_STRUCTURE])
        body_ids += [token_ids[position:start], sentinel]
        body_parts += [parts[position:start], structure]
        tail_ids += [sentinel, token_ids[start:end]]
        tail_parts += [structure, parts[start:end]]
        position = end
    body_ids.append(token_ids[position:])
    body_parts.append(parts[position:])
    infill_ids, infill_parts = torch.tensor([vocabulary.infill_id]), torch.tensor([PART_STRUCTURE])
    return Document(torch.cat(body_ids + [infill_ids] + tail_ids),
                    torch.cat(body_parts + [infill_parts] + tail_parts))


def unmask(document: Document, vocabulary: CM3Vocabulary) -> Document:
    """Inverse of :func:`causally_mask`: put every span back in place of its sentinel."""
    token_ids, parts = document.token_ids.tolist(), document.parts.tolist()
    if vocabulary.infill_id not in token_ids:
        return document
    split = token_ids.index(vocabulary.infill_id)
    body = list(zip(token_ids[:split], parts[:split], strict=True))
    tail = list(zip(token_ids[split + 1:], parts[split + 1:], strict=True))
    sentinel_ids = {vocabulary.mask_id(index) for index in range(NUM_MASK_SENTINELS)}
    spans: dict[int, list[tuple[int, int]]] = {}
    current = None
    for token, part in tail:
        if token in sentinel_ids:
            current = token
            spans[current] = []
        elif current is None:
            raise ValueError("unmask: tokens after <infill> before any <mask:i> sentinel")
        else:
            spans[current].append((token, part))
    restored = []
    for token, part in body:
        restored.extend(spans.get(token, [])) if token in sentinel_ids else restored.append((token, part))
    return Document(torch.tensor([token for token, _ in restored], dtype=torch.int64),
                    torch.tensor([part for _, part in restored], dtype=torch.int64))
