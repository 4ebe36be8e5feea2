"""Retrieval-augmented CM3 sequences and their loss (RA-CM3 "Retriever", "Generator").

Per training example x (docs/methods.md, R2 and R3):
  - the query is x's text part or its image part, never the whole document;
  - query dropout: ~20% of the query's tokens are dropped before encoding;
  - K ~ Uniform{0, 1, 2} documents are retrieved from the memory with the
    diversity filter (skip a candidate scoring > 0.9 with the query or with a
    document already taken), never x itself;
  - the sequence is (m_1 .. m_K, x), each document closed by ``</doc>``, within
    the token budget (retrieved documents are dropped, last first, until it fits);
  - loss L = L_main + alpha * L_retr, per-token cross-entropy averaged over the
    main document's tokens and over the retrieved documents' tokens, alpha = 0.1.
Every token of the transformed document is a target, the sentinels (``<mask:i>``, ``<infill>``)
included: CM3's objective is -log p of the whole transformed sequence (docs/methods.md, R3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mkfast.ops.topk_dedup import REDUNDANCY_THRESHOLD
from mkfast.racm3.documents import DEFAULT_MASK_PROBABILITY, Document, causally_mask, format_document
from mkfast.racm3.encoder import QUERY_DROPOUT, MixedModalEncoder
from mkfast.racm3.memory import Memory
from mkfast.racm3.vocabulary import PART_IMAGE, PART_STRUCTURE, PART_TEXT, CM3Vocabulary

RETRIEVAL_THRESHOLD = REDUNDANCY_THRESHOLD  # RA-CM3's diversity filter
LOSS_ALPHA = 0.1  # RA-CM3: weight of the retrieved documents' loss
MAX_RETRIEVED = 2  # K ~ Uniform{0, 1, 2} in training
ROLE_RETRIEVED = 0
ROLE_MAIN = 1
IGNORE = -100
EVALUATION_CHUNK = 32  # held-out documents per forward pass


def search_memory(memory, queries: torch.Tensor, k: int, threshold: float = RETRIEVAL_THRESHOLD,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The one place retrieval happens: (b, d) queries -> (b, k) document ids, -1 padded.

    memory: a :class:`mkfast.racm3.memory.Memory` (exact MIPS + RA-CM3's diversity
    filter through ``mkfast.ops.topk_dedup``); exclude: (b, E) int64 document ids
    never returned (the example itself in training).
    """
    _, document_ids = memory.search(queries.to(memory.embeddings.dtype), k, threshold=threshold,
                                    exclude_ids=exclude)
    return document_ids


@dataclass
class SequenceOptions:
    max_retrieved: int = MAX_RETRIEVED
    query_dropout: float = QUERY_DROPOUT
    threshold: float = RETRIEVAL_THRESHOLD
    mask_probability: float = DEFAULT_MASK_PROBABILITY  # CM3: half plain, half causally masked
    mean_span_length: float = 8.0
    max_sequence_length: int = 4096


@dataclass
class Batch:
    """input_ids, attention_mask, labels, target_roles, target_parts: (B, T); labels IGNORE where no loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_roles: torch.Tensor
    target_parts: torch.Tensor
    retrieved: list[list[int]]

    def to(self, device) -> Batch:
        tensors = (self.input_ids, self.attention_mask, self.labels, self.target_roles, self.target_parts)
        return Batch(*(tensor.to(device) for tensor in tensors), self.retrieved)


class RetrievalCorpus:
    """Documents (caption i, image codes i) with their CLIP memory; builds training and evaluation batches.

    texts: N strings; images: (N, 3, H, W) in [0, 1] (for image queries);
    codes: (N, r, r) VQ codes; memory_embeddings: (N, d) unit-norm document embeddings.
    memory_device: where the memory rows live and the top-k search runs (a GPU runs mkfast's
    top-k kernel there); the CPU by default, since a web-scale memory outgrows a GPU.
    """

    def __init__(self, vocabulary: CM3Vocabulary, encoder: MixedModalEncoder | None, texts: list[str],
                 images: torch.Tensor, codes: torch.Tensor, memory_embeddings: torch.Tensor | None = None,
                 memory_device: torch.device | str = "cpu"):
        self.vocabulary, self.encoder = vocabulary, encoder
        self.texts, self.images, self.codes = texts, images, codes
        if memory_embeddings is None and encoder is not None:
            memory_embeddings = encoder.encode_documents(texts, images)
        self.memory_embeddings = memory_embeddings
        # Document id i = training example i, so excluding an example is excluding its id.
        self.memory = (None if memory_embeddings is None
                       else Memory(memory_embeddings.float().to(memory_device)))
        self.documents = [format_document(vocabulary, text, code)
                          for text, code in zip(texts, codes, strict=True)]

    def __len__(self) -> int:
        return len(self.texts)

    def encode_queries(self, texts: list[str], images: torch.Tensor, query_parts: list[str],
                       drop_fraction: float, generator: torch.Generator) -> torch.Tensor:
        """One query per example from its text part ("text") or image part ("image") -> (b, d)."""
        queries = torch.zeros(len(query_parts), self.memory_embeddings.shape[1])
        text_rows = [row for row, part in enumerate(query_parts) if part == "text"]
        image_rows = [row for row, part in enumerate(query_parts) if part == "image"]
        if text_rows:
            queries[text_rows] = self.encoder.encode_texts([texts[row] for row in text_rows],
                                                           drop_fraction=drop_fraction,
                                                           generator=generator).cpu()
        if image_rows:
            queries[image_rows] = self.encoder.encode_images(images[image_rows], drop_fraction=drop_fraction,
                                                             generator=generator).cpu()
        return queries

    def retrieve(self, texts: list[str], images: torch.Tensor, query_parts: list[str], counts: list[int],
                 options: SequenceOptions, generator: torch.Generator,
                 exclude: list[int] | None = None) -> list[list[int]]:
        """Per example, up to counts[i] memory indices (never exclude[i]); [] where counts[i] == 0."""
        if max(counts, default=0) == 0 or self.memory_embeddings is None:
            return [[] for _ in counts]
        queries = self.encode_queries(texts, images, query_parts, options.query_dropout, generator)
        exclusion = None if exclude is None else torch.tensor(exclude, dtype=torch.int64).unsqueeze(1)
        indices = search_memory(self.memory, queries, max(counts), options.threshold, exclusion)
        return [[index for index in row[:count] if index >= 0]
                for row, count in zip(indices.tolist(), counts, strict=True)]

    def example_document(self, index: int) -> Document:
        """The document training example ``index`` trains on (before masking)."""
        return self.documents[index]

    def retrieval_queries(self, example_indices: list[int],
                          counts: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(memory rows whose text or image is the query, documents to retrieve, row to exclude)
        per example: here each example is its own memory row, never retrieved for itself."""
        return list(example_indices), counts, list(example_indices)

    def training_batch(self, example_indices: list[int], options: SequenceOptions,
                       generator: torch.Generator) -> Batch:
        """RA-CM3 training sequences for memory rows ``example_indices``; all randomness from
        ``generator``."""
        batch_size = len(example_indices)
        # Masking draws from its own generator so that runs differing only in
        # retrieval (e.g. K = 0) see the same masked documents.
        masking_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        masking_generator = torch.Generator().manual_seed(masking_seed)
        counts = torch.randint(0, options.max_retrieved + 1, (batch_size,), generator=generator).tolist()
        query_parts = ["text" if bit else "image" for bit in torch.randint(0, 2, (batch_size,),
                                                                           generator=generator).tolist()]
        rows, counts, exclude = self.retrieval_queries(example_indices, counts)
        retrieved = self.retrieve([self.texts[row] for row in rows], self.images[rows], query_parts, counts,
                                  options, generator, exclude=exclude)
        mains = []
        for index in example_indices:
            document = self.example_document(index)
            if float(torch.rand((), generator=masking_generator)) < options.mask_probability:
                document = causally_mask(document, self.vocabulary, masking_generator,
                                         options.mean_span_length)
            mains.append(document)
        return self.collate([[self.documents[index] for index in row] for row in retrieved], mains,
                            options.max_sequence_length, retrieved)

    def collate(self, retrieved_documents: list[list[Document]], mains: list[Document],
                max_sequence_length: int, retrieved: list[list[int]]) -> Batch:
        """Build ``</doc> m_1 </doc> .. m_K </doc> x </doc>`` per example, right-padded into a Batch.

        The leading ``</doc>`` makes every document token a prediction target,
        with or without retrieval, so main losses compare across K.
        """
        separator = torch.tensor([self.vocabulary.separator_id])
        structure = torch.tensor([PART_STRUCTURE])
        sequences = []
        for documents, main, row in zip(retrieved_documents, mains, retrieved, strict=True):
            documents = list(documents)
            main_length = len(main) + 1
            while (documents and 1 + sum(len(document) + 1 for document in documents) + main_length
                   > max_sequence_length):
                documents.pop()
                row.pop()
            first_role = ROLE_MAIN if not documents else ROLE_RETRIEVED
            ids, parts, roles = [separator], [structure], [torch.tensor([first_role])]
            for document in documents:
                ids += [document.token_ids, separator]
                parts += [document.parts, structure]
                roles.append(torch.full((len(document) + 1,), ROLE_RETRIEVED))
            ids += [main.token_ids, separator]
            parts += [main.parts, structure]
            roles.append(torch.full((main_length,), ROLE_MAIN))
            sequence = (torch.cat(ids), torch.cat(parts), torch.cat(roles))
            sequences.append(tuple(tensor[:max_sequence_length] for tensor in sequence))
        length = max(sequence[0].shape[0] for sequence in sequences) - 1
        batch_size = len(sequences)
        input_ids = torch.full((batch_size, length), self.vocabulary.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros(batch_size, length, dtype=torch.int64)
        labels = torch.full((batch_size, length), IGNORE, dtype=torch.int64)
        target_roles = torch.full((batch_size, length), ROLE_MAIN, dtype=torch.int64)
        target_parts = torch.full((batch_size, length), PART_STRUCTURE, dtype=torch.int64)
        for row, (ids, parts, roles) in enumerate(sequences):
            size = ids.shape[0] - 1
            input_ids[row, :size] = ids[:-1]
            attention_mask[row, :size] = 1
            labels[row, :size] = ids[1:]
            target_roles[row, :size] = roles[1:]
            target_parts[row, :size] = parts[1:]
        return Batch(input_ids, attention_mask, labels, target_roles, target_parts, retrieved)

    def evaluation_batch(self, texts: list[str], images: torch.Tensor, codes: torch.Tensor, query_part: str,
                         retrieved_count: int, options: SequenceOptions, generator: torch.Generator) -> Batch:
        """Plain (unmasked) held-out documents, each with ``retrieved_count`` documents retrieved
        by ``query_part``."""
        counts = [retrieved_count] * len(texts)
        # Evaluation queries are clean: query dropout is a training-time regulariser.
        clean = SequenceOptions(**{**options.__dict__, "query_dropout": 0.0})
        retrieved = self.retrieve(texts, images, [query_part] * len(texts), counts, clean, generator)
        mains = [format_document(self.vocabulary, text, code)
                 for text, code in zip(texts, codes, strict=True)]
        return self.collate([[self.documents[index] for index in row] for row in retrieved], mains,
                            options.max_sequence_length, retrieved)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> per-token cross-entropy (B, T) fp32, 0 where IGNORE."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")


def retrieval_augmented_loss(logits: torch.Tensor, batch: Batch, alpha: float = LOSS_ALPHA,
                             ) -> tuple[torch.Tensor, dict[str, float]]:
    """RA-CM3: L = L_main + alpha * L_retr (each a per-token mean over its part); returns (loss, parts)."""
    losses = token_losses(logits, batch.labels)
    has_target = batch.labels != IGNORE
    main = has_target & (batch.target_roles == ROLE_MAIN)
    retrieved = has_target & (batch.target_roles == ROLE_RETRIEVED)
    main_loss = (losses * main).sum() / main.sum().clamp(min=1)
    retrieved_loss = (losses * retrieved).sum() / retrieved.sum().clamp(min=1)
    loss = main_loss + alpha * retrieved_loss
    return loss, {"loss": loss.item(), "main_loss": main_loss.item(), "retrieved_loss": retrieved_loss.item(),
                  "retrieved_tokens": int(retrieved.sum())}


@torch.no_grad()
def evaluate_main_loss(model, corpus: RetrievalCorpus, texts: list[str], images: torch.Tensor,
                       codes: torch.Tensor, query_part: str, retrieved_count: int,
                       options: SequenceOptions) -> dict[str, float]:
    """Mean cross-entropy of the main documents' image tokens and caption tokens (nats / token)."""
    model.eval()
    device = next(model.parameters()).device
    sums = {"image": 0.0, "text": 0.0}
    counts = {"image": 0, "text": 0}
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(texts), EVALUATION_CHUNK):
        stop = start + EVALUATION_CHUNK
        batch = corpus.evaluation_batch(texts[start:stop], images[start:stop], codes[start:stop], query_part,
                                        retrieved_count, options, generator).to(device)
        # Right padding: the causal mask suffices (see trainer); no KV cache is built for one pass.
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        losses = token_losses(logits, batch.labels)
        main = (batch.labels != IGNORE) & (batch.target_roles == ROLE_MAIN)
        for name, part in (("image", PART_IMAGE), ("text", PART_TEXT)):
            selected = main & (batch.target_parts == part)
            sums[name] += float(losses[selected].sum())
            counts[name] += int(selected.sum())
    return {name: sums[name] / max(1, counts[name]) for name in sums}
