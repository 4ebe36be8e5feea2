"""The RA-CM3 demo's design: knowledge that only the memory holds.

The generators train on image-caption documents of SEEN_CLASSES only, plus text-only
documents naming every digit (and the k-shot labels), so every class name's embedding is
trained while the images of MEMORY_ONLY_CLASSES never reach them. The retriever and the
VQ tokenizer, standing in for off-the-shelf components, train on every class, and the
evaluation memory holds documents of every class. Retrieval can then help a generator on
the memory-only digits only by handing it what the memory knows.

The diversity filter's threshold is calibrated to its purpose, removing near-duplicates,
on the demo's own encoder (:func:`calibrate_threshold`): RA-CM3's 0.9 was set for a CLIP
whose same-topic documents score far lower than the demo's (whose same-class documents
share their caption, and so score ~0.95 with each other).
"""

from __future__ import annotations

import torch

from mkfast.data.digits import DIGIT_NAMES, digit_caption
from mkfast.racm3.documents import Document, format_document
from mkfast.racm3.inference import NONSENSE_LABELS
from mkfast.racm3.retrieval import RetrievalCorpus, SequenceOptions

SEEN_CLASSES = (0, 1, 2, 3, 4, 5, 6)
MEMORY_ONLY_CLASSES = (7, 8, 9)
# Each text-only document appears this many times in the training examples: ~10% of draws with
# ~1000 image documents, so each name is trained a few hundred times over a run.
TEXT_ONLY_REPEATS = 10
# Same-class documents this close are near-duplicates; 99% of same-class pairs stay below.
NEAR_DUPLICATE_QUANTILE = 0.99


def text_only_documents(repeats: int = TEXT_ONLY_REPEATS) -> list[str]:
    """Every digit's caption and each k-shot label, as text alone, ``repeats`` times each."""
    texts = [digit_caption(label) for label in range(len(DIGIT_NAMES))] + list(NONSENSE_LABELS)
    return texts * repeats


class TrainingCorpus(RetrievalCorpus):
    """Image-caption documents (the training memory) plus text-only documents as extra examples.

    Examples 0..N-1 are the memory's documents, trained as :class:`RetrievalCorpus` trains
    them; examples N.. are the text-only documents, trained without retrieval (the memory
    holds no document about a memory-only digit to hand them) and never in the memory.
    """

    def __init__(self, vocabulary, encoder, texts: list[str], images: torch.Tensor, codes: torch.Tensor,
                 text_only: list[str], memory_device: torch.device | str = "cpu"):
        super().__init__(vocabulary, encoder, texts, images, codes, memory_device=memory_device)
        self.text_only_documents = [format_document(vocabulary, text) for text in text_only]

    def __len__(self) -> int:
        return len(self.texts) + len(self.text_only_documents)

    def example_document(self, index: int) -> Document:
        count = len(self.texts)
        return self.documents[index] if index < count else self.text_only_documents[index - count]

    def retrieval_queries(self, example_indices: list[int],
                          counts: list[int]) -> tuple[list[int], list[int], list[int]]:
        # Text-only examples retrieve nothing; their query row is a stand-in that is never encoded.
        count = len(self.texts)
        counts = [retrieved if index < count else 0
                  for retrieved, index in zip(counts, example_indices, strict=True)]
        rows = [min(index, count - 1) for index in example_indices]
        exclude = [index if index < count else -1 for index in example_indices]
        return rows, counts, exclude


def same_class_cosines(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cosines between distinct documents of one class (each pair once), from unit-norm (N, d) rows."""
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = embeddings @ embeddings.T
    upper = torch.ones_like(similarity, dtype=torch.bool).triu(1)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) & upper
    return similarity[same]


def calibrate_threshold(embeddings: torch.Tensor, labels: torch.Tensor,
                        quantile: float = NEAR_DUPLICATE_QUANTILE) -> float:
    """The filter's threshold: the ``quantile`` of cosines between distinct same-class documents.

    Above it a pair is as close as the closest 1% of same-class pairs: near-duplicates, which
    the filter removes, while the other same-class neighbours (the useful ones) stay.
    """
    cosines = same_class_cosines(embeddings, labels)
    if cosines.numel() == 0:
        raise ValueError("calibrate_threshold: no two documents share a class")
    return float(torch.quantile(cosines.double(), quantile))


def retrieval_precision(corpus: RetrievalCorpus, memory_labels: torch.Tensor, texts: list[str],
                        images: torch.Tensor, labels: torch.Tensor, query_part: str, k: int,
                        threshold: float) -> float:
    """Fraction of the k documents retrieved per clean query that are of the query's class."""
    options = SequenceOptions(max_retrieved=k, query_dropout=0.0, threshold=threshold)
    rows = corpus.retrieve(texts, images, [query_part] * len(texts), [k] * len(texts), options,
                           torch.Generator().manual_seed(0))
    hits = [int(memory_labels[row]) == int(label)
            for row_ids, label in zip(rows, labels, strict=True) for row in row_ids]
    return sum(hits) / max(1, len(hits))
