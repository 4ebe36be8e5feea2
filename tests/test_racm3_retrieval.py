"""Retrieval-augmented sequences: self never retrieved, the 0.9 filter, K in {0,1,2}, budget, loss
weighting."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from mkfast.racm3.retrieval import (
    IGNORE,
    ROLE_MAIN,
    ROLE_RETRIEVED,
    RetrievalCorpus,
    SequenceOptions,
    retrieval_augmented_loss,
)
from mkfast.racm3.vocabulary import CM3Vocabulary

COUNT, DIMENSION, CODES = 40, 16, 12


class PartEncoder:
    """Stands in for MixedModalEncoder: queries are fixed vectors per part, so scores are known exactly."""

    def __init__(self, text_vectors, image_vectors):
        self.text_vectors, self.image_vectors = text_vectors, image_vectors
        self.texts = None

    def encode_texts(self, texts, drop_fraction=0.0, generator=None):
        return self.text_vectors[[int(text.split()[-1]) for text in texts]]

    def encode_images(self, images, drop_fraction=0.0, generator=None):
        return self.image_vectors[images[:, 0, 0, 0].long()]


@pytest.fixture(scope="module")
def corpus():
    generator = torch.Generator().manual_seed(0)
    # Clusters of 4 near-duplicates: many candidates above 0.9 with each other.
    centres = F.normalize(torch.randn(COUNT // 4, DIMENSION, generator=generator), dim=-1)
    memory = F.normalize(centres.repeat_interleave(4, 0)
                         + 0.1 * torch.randn(COUNT, DIMENSION, generator=generator), dim=-1)
    # Each example's query is close to its own document (score ~0.85, under 0.9), so only the
    # exclusion keeps it out.
    noise = F.normalize(torch.randn(COUNT, DIMENSION, generator=generator), dim=-1)
    text_queries = F.normalize(memory + 0.6 * noise, dim=-1)
    image_queries = F.normalize(memory - 0.6 * noise, dim=-1)
    texts = [f"document number {index}" for index in range(COUNT)]
    images = torch.arange(COUNT, dtype=torch.float32).view(COUNT, 1, 1, 1).expand(COUNT, 3, 4, 4)
    codes = torch.randint(0, CODES, (COUNT, 3, 3), generator=generator)
    vocabulary = CM3Vocabulary.from_corpus(texts, CODES, text_vocabulary_size=280)
    return RetrievalCorpus(vocabulary, PartEncoder(text_queries, image_queries), texts, images, codes, memory)


def test_retrieval_never_returns_the_example_and_respects_the_threshold(corpus):
    options = SequenceOptions(max_retrieved=2)
    indices = list(range(COUNT))
    self_would_be_found = 0
    for part, queries in (("text", corpus.encoder.text_vectors), ("image", corpus.encoder.image_vectors)):
        retrieved = corpus.retrieve(corpus.texts, corpus.images, [part] * COUNT, [2] * COUNT, options,
                                    torch.Generator(), exclude=indices)
        unfiltered = corpus.retrieve(corpus.texts, corpus.images, [part] * COUNT, [2] * COUNT, options,
                                     torch.Generator(), exclude=None)
        self_would_be_found += sum(index in row for index, row in enumerate(unfiltered))
        for index, row in enumerate(retrieved):
            assert index not in row
            assert len(row) == 2
            scores = queries[index] @ corpus.memory_embeddings[row].T
            assert bool((scores <= 0.9).all())
            assert float(corpus.memory_embeddings[row[0]] @ corpus.memory_embeddings[row[1]]) <= 0.9
    # The test can fail: without the exclusion the example itself is among the top results.
    assert self_would_be_found > COUNT // 2


def test_training_batch_builds_k_in_0_1_2_with_roles_and_loss_on_every_token(corpus):
    options = SequenceOptions(max_retrieved=2, mask_probability=1.0, mean_span_length=3.0)
    seen_counts = set()
    for seed in range(6):
        example_indices = list(range(seed, seed + 8))
        batch = corpus.training_batch(example_indices, options, torch.Generator().manual_seed(seed))
        for row, (index, retrieved) in enumerate(zip(example_indices, batch.retrieved, strict=True)):
            seen_counts.add(len(retrieved))
            assert index not in retrieved
            size = int(batch.attention_mask[row].sum())
            sequence = torch.cat([batch.input_ids[row, :1], batch.labels[row, :size].clamp(min=0)])
            expected_retrieved_tokens = sum(len(corpus.documents[other]) + 1 for other in retrieved)
            assert int((batch.target_roles[row, :size] == ROLE_RETRIEVED).sum()) == expected_retrieved_tokens
            # The first retrieved document follows the leading separator token for token.
            if retrieved:
                document = corpus.documents[retrieved[0]].token_ids
                assert torch.equal(batch.labels[row, :len(document)], document)
            # CM3's objective is -log p of the whole transformed document: the sentinels and <infill>
            # the masking moved in are targets like every other token.
            main_targets = batch.labels[row, :size][batch.target_roles[row, :size] == ROLE_MAIN]
            assert bool(corpus.vocabulary.is_sentinel(main_targets).any())
            assert not bool((batch.labels[row, :size] == IGNORE).any())
            assert torch.equal(batch.labels[row, :size - 1], batch.input_ids[row, 1:size])
            assert sequence.shape[0] == size + 1
    assert seen_counts == {0, 1, 2}


def test_retrieved_documents_are_dropped_to_fit_the_budget(corpus):
    document_length = len(corpus.documents[0]) + 1
    options = SequenceOptions(max_retrieved=2, mask_probability=0.0,
                              max_sequence_length=1 + 2 * document_length)
    batch = corpus.evaluation_batch(corpus.texts[:4], corpus.images[:4], corpus.codes[:4], "text", 2, options,
                                    torch.Generator())
    assert all(len(row) == 1 for row in batch.retrieved)
    assert batch.input_ids.shape[1] <= options.max_sequence_length - 1


def test_alpha_zero_is_the_plain_cm3_loss_on_the_main_document(corpus):
    batch = corpus.training_batch(list(range(8)), SequenceOptions(max_retrieved=2),
                                  torch.Generator().manual_seed(3))
    assert any(batch.retrieved)
    logits = torch.randn(*batch.input_ids.shape, len(corpus.vocabulary),
                         generator=torch.Generator().manual_seed(1))
    main_losses, retrieved_losses = [], []
    for row in range(batch.input_ids.shape[0]):
        for position in range(batch.input_ids.shape[1]):
            label = int(batch.labels[row, position])
            if label == IGNORE:
                continue
            loss = F.cross_entropy(logits[row, position:position + 1],
                                   batch.labels[row, position:position + 1])
            (main_losses if batch.target_roles[row, position] == ROLE_MAIN else retrieved_losses).append(loss)
    main, retrieved = torch.stack(main_losses).mean(), torch.stack(retrieved_losses).mean()
    loss_alpha_zero, parts = retrieval_augmented_loss(logits, batch, alpha=0.0)
    assert_close(loss_alpha_zero, main, dtype=torch.float32)
    loss_default, parts = retrieval_augmented_loss(logits, batch)
    assert_close(loss_default, main + 0.1 * retrieved, dtype=torch.float32)
    assert parts["retrieved_tokens"] == len(retrieved_losses)
