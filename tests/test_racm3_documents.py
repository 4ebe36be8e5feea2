"""CM3 vocabulary, document format and the causally-masked transform."""

import pytest
import torch

from mkfast.racm3.documents import Document, causally_mask, format_document, sample_spans, unmask
from mkfast.racm3.vocabulary import (
    PART_IMAGE,
    PART_STRUCTURE,
    PART_TEXT,
    CM3Vocabulary,
)

CORPUS = ["a handwritten digit seven", "a handwritten digit three", "a photo of a cat", "ünïcode ok"]
CODEBOOK_SIZE = 16


@pytest.fixture(scope="module")
def vocabulary():
    return CM3Vocabulary.from_corpus(CORPUS, image_codebook_size=CODEBOOK_SIZE, text_vocabulary_size=300)


def test_vocabulary_layout_is_contiguous_and_text_round_trips(vocabulary):
    assert vocabulary.text_offset == len(vocabulary.special_ids)
    assert vocabulary.image_offset == vocabulary.text_offset + vocabulary.text_size
    assert len(vocabulary) == vocabulary.image_offset + CODEBOOK_SIZE
    for text in CORPUS + ["never seen: 42 zebras!"]:
        ids = vocabulary.encode_text(text)
        assert all(vocabulary.text_offset <= token < vocabulary.image_offset for token in ids)
        assert vocabulary.decode_text(ids) == text
    # The trained BPE merges frequent words: "handwritten" must not be one id per byte.
    assert len(vocabulary.encode_text("handwritten")) < len("handwritten")


def test_vocabulary_serialises(vocabulary):
    restored = CM3Vocabulary.from_json(vocabulary.to_json())
    assert len(restored) == len(vocabulary)
    assert restored.encode_text(CORPUS[0]) == vocabulary.encode_text(CORPUS[0])


def test_image_codes_out_of_range_are_refused(vocabulary):
    with pytest.raises(ValueError, match="image codes"):
        vocabulary.encode_image(torch.tensor([0, CODEBOOK_SIZE]))


def test_document_formats_as_img_alt_src(vocabulary):
    codes = torch.arange(6).reshape(2, 3)
    document = format_document(vocabulary, "a photo of a cat", codes)
    special = vocabulary.special_ids
    text_ids = vocabulary.encode_text("a photo of a cat")
    expected = ([special["<img alt="]] + text_ids + [special[" src="]] + vocabulary.encode_image(codes)
                + [special[">"]])
    assert document.token_ids.tolist() == expected
    expected_parts = ([PART_STRUCTURE] + [PART_TEXT] * len(text_ids) + [PART_STRUCTURE] + [PART_IMAGE] * 6
                      + [PART_STRUCTURE])
    assert document.parts.tolist() == expected_parts
    assert vocabulary.decode_image(document.token_ids.tolist()).tolist() == list(range(6))


def test_single_part_documents(vocabulary):
    text_only = format_document(vocabulary, text="a cat")
    assert set(text_only.parts.tolist()) == {PART_TEXT}
    image_only = format_document(vocabulary, image_codes=torch.tensor([1, 2]))
    assert (image_only.parts == PART_TEXT).sum() == 0 and (image_only.parts == PART_IMAGE).sum() == 2
    with pytest.raises(ValueError):
        format_document(vocabulary)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 40, 75])
def test_spans_are_disjoint_separated_and_inside(length):
    generator = torch.Generator().manual_seed(length)
    for _ in range(50):
        spans = sample_spans(length, generator, mean_span_length=5.0)
        assert len(spans) >= 1
        for start, end in spans:
            assert 0 <= start < end <= length
        # Consecutive pairs: the shifted copy is one shorter by design.
        for (_, previous_end), (next_start, _) in zip(spans, spans[1:], strict=False):
            assert next_start > previous_end


@pytest.mark.parametrize("seed", range(20))
def test_causal_mask_moves_spans_after_infill_and_unmask_restores_exactly(vocabulary, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CODEBOOK_SIZE, (5, 5), generator=generator)
    document = format_document(vocabulary, CORPUS[seed % len(CORPUS)], codes)
    masked = causally_mask(document, vocabulary, generator, mean_span_length=6.0)
    assert (masked.token_ids == vocabulary.infill_id).sum() == 1
    sentinels = vocabulary.is_sentinel(masked.token_ids)
    mask_count = int(sentinels.sum()) - 1
    assert mask_count % 2 == 0 and mask_count >= 2  # each <mask:i> appears in the body and the tail
    # Non-sentinel tokens are the document's tokens, once each (a permutation).
    assert sorted(masked.token_ids[~sentinels].tolist()) == sorted(document.token_ids.tolist())
    assert len(masked) == len(document) + mask_count + 1
    restored = unmask(masked, vocabulary)
    assert torch.equal(restored.token_ids, document.token_ids)
    assert torch.equal(restored.parts, document.parts)


def test_unmask_of_plain_document_is_identity(vocabulary):
    document = format_document(vocabulary, "a cat", torch.tensor([3, 4]))
    assert unmask(document, vocabulary) is document


def test_masked_document_is_a_document(vocabulary):
    document = format_document(vocabulary, "x", torch.tensor([0]))
    masked = causally_mask(document, vocabulary, torch.Generator().manual_seed(0))
    assert isinstance(masked, Document) and masked.parts.shape == masked.token_ids.shape
