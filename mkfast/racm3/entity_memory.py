"""RA-CM3's claim where it must hold: named entities whose images only the memory holds.

On the digits (mkfast.racm3.demo) a generator can lower its loss on its training images by
memorising them, and does, before it learns to use retrieved images. This check removes that
way out, so that retrieval must help if the implementation is right: every entity has a
random name (three syllables) and an image of random codes, so nothing but the memory tells a
model an unseen entity's image, and no model without the memory can beat ln(codebook) nats
per image token on it. The generator trains on the documents of ``trained`` entities; the
memory holds those and ``memory_only`` more. Each document is in the memory twice: training
excludes an example's own row, as RA-CM3 does, and its twin is what retrieval can usefully
hand back.

The retriever is exact (:class:`ExactEncoder`: one random unit vector per caption and per
image), standing in for one that finds the entity, which the demo's small CLIP cannot do for
hundreds of names. Everything else is the method as the digits demo runs it: the memory
search with the diversity filter (twins score 1.0 with each other, so the second copy is
skipped, while a caption query scores ~0.71 with its document and passes), K ~ U{0,1,2},
the CM3 transform, L_main + 0.1 L_retr, the trainer and the Llama generator.

At the CPU sizes (300 trained entities, 4x4 codes from 128, a 2-layer generator, 1500 steps)
the generator learned to copy in each of 3 exploratory runs, abruptly, between steps ~450 and
~1100; with 2000 trained entities (four-syllable names) the onset came later (~1100 steps).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mkfast.claims import paired_claim
from mkfast.data.nonce_names import nonce_names
from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.retrieval import MAX_RETRIEVED, RetrievalCorpus, SequenceOptions, evaluate_main_loss
from mkfast.racm3.trainer import Trainer, TrainingConfig
from mkfast.racm3.vocabulary import CM3Vocabulary

PAPER = "RA-CM3"
NAME_SYLLABLES = 3
EMBEDDING_DIM = 32
# Text tokens: each syllable gets its own (a name is three tokens; a test checks it).
TEXT_VOCABULARY = 300
ARMS = "RA-CM3 K=2 vs K=0, entities only the memory holds"


@dataclass(frozen=True)
class EntitySizes:
    trained: int  # entities the generator trains on
    memory_only: int  # entities only the memory holds (the evaluation)
    steps: int
    codebook: int = 128
    grid: int = 4  # an image is grid x grid codes, as the digits' VQ tokenizer gives
    num_layers: int = 2  # the demo's generator with fewer layers: copying needs two


QUICK = EntitySizes(trained=24, memory_only=8, steps=20)
FULL = EntitySizes(trained=300, memory_only=100, steps=1500)


@dataclass
class EntityWorld:
    """Entity i: caption texts[i], image codes[i] (grid x grid); images[i] carries i for the encoder."""

    texts: list[str]
    codes: torch.Tensor
    images: torch.Tensor
    text_vectors: torch.Tensor
    image_vectors: torch.Tensor
    trained: int

    @property
    def memory_only(self) -> range:
        return range(self.trained, len(self.texts))


def make_world(sizes: EntitySizes, seed: int) -> EntityWorld:
    """Distinct random names, random code images and the exact retriever's vectors, all from ``seed``."""
    count = sizes.trained + sizes.memory_only
    generator = torch.Generator().manual_seed(seed)
    names = nonce_names(count, generator, NAME_SYLLABLES)
    text_vectors = F.normalize(torch.randn(count, EMBEDDING_DIM, generator=generator), dim=-1)
    image_vectors = F.normalize(torch.randn(count, EMBEDDING_DIM, generator=generator), dim=-1)
    codes = torch.randint(0, sizes.codebook, (count, sizes.grid, sizes.grid), generator=generator)
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, 2, 2)
    return EntityWorld(names, codes, images.contiguous(), text_vectors, image_vectors, sizes.trained)


class ExactEncoder:
    """A perfect retriever: a caption's vector and an image's vector are the entity's own.

    Query dropout has nothing to drop from an exact key, so it is ignored.
    """

    def __init__(self, world: EntityWorld):
        self.rows = {text: row for row, text in enumerate(world.texts)}
        self.text_vectors, self.image_vectors = world.text_vectors, world.image_vectors

    def encode_texts(self, texts: list[str], drop_fraction: float = 0.0, generator=None) -> torch.Tensor:
        return self.text_vectors[[self.rows[text] for text in texts]]

    def encode_images(self, images: torch.Tensor, drop_fraction: float = 0.0, generator=None) -> torch.Tensor:
        return self.image_vectors[images[:, 0, 0, 0].long()]

    def encode_documents(self, texts: list[str], images: torch.Tensor) -> torch.Tensor:
        """RA-CM3's document embedding: the mean of its text and image embeddings, unit norm."""
        return F.normalize(self.encode_texts(texts) + self.encode_images(images), dim=-1)


def vocabulary_of(world: EntityWorld, codebook: int) -> CM3Vocabulary:
    return CM3Vocabulary.from_corpus(world.texts, codebook, TEXT_VOCABULARY)


def twin_corpus(world: EntityWorld, vocabulary: CM3Vocabulary,
                entities: range | list[int]) -> RetrievalCorpus:
    """Each entity's document twice (rows i and i + len(entities)): its own row excluded, the twin not."""
    rows = torch.tensor(list(entities), dtype=torch.int64).repeat(2)
    return RetrievalCorpus(vocabulary, ExactEncoder(world), [world.texts[row] for row in rows.tolist()],
                           world.images[rows], world.codes[rows])


@dataclass
class EntityCorpora:
    """The check's vocabulary and memories, built once and shared by every seed's run."""

    vocabulary: CM3Vocabulary
    training: RetrievalCorpus  # the trained entities, each twice: the memory training retrieves from
    memory: RetrievalCorpus  # every entity, each twice


def build_corpora(world: EntityWorld, codebook: int) -> EntityCorpora:
    vocabulary = vocabulary_of(world, codebook)
    return EntityCorpora(vocabulary, twin_corpus(world, vocabulary, range(world.trained)),
                         twin_corpus(world, vocabulary, range(len(world.texts))))


def own_document_rate(corpus: RetrievalCorpus, world: EntityWorld, query_part: str) -> float:
    """Share of memory-only entities whose own document is among the K=2 retrieved by ``query_part``."""
    entities = list(world.memory_only)
    texts = [world.texts[entity] for entity in entities]
    retrieved = corpus.retrieve(texts, world.images[entities], [query_part] * len(entities),
                                [MAX_RETRIEVED] * len(entities), SequenceOptions(query_dropout=0.0),
                                torch.Generator().manual_seed(0))
    found = sum(any(corpus.texts[row] == text for row in rows)
                for text, rows in zip(texts, retrieved, strict=True))
    return found / len(entities)


def train_and_evaluate(world: EntityWorld, corpora: EntityCorpora, sizes: EntitySizes,
                       generator_config: GeneratorConfig, training: dict, seed: int, output_dir: str,
                       progress: bool = False) -> tuple[dict, float]:
    """Train one retrieval generator on the trained entities; (evaluation, seconds).

    evaluation: {configuration: {"image": nll, "text": nll}} on the memory-only entities, image
    tokens retrieved by the caption, caption tokens by the image, for K=2 from the full memory
    ("k2"), K=2 from a memory of the trained entities only ("k2_cut_memory") and K=0 ("k0").
    training: batch_size, learning_rate, warmup_steps (the digits demo's).
    """
    started = time.perf_counter()
    vocabulary = corpora.vocabulary
    options = SequenceOptions(max_sequence_length=generator_config.max_sequence_length)
    torch.manual_seed(seed)
    model = build_generator(len(vocabulary), replace(generator_config, num_layers=sizes.num_layers),
                            pad_token_id=vocabulary.pad_id)
    config = TrainingConfig(steps=sizes.steps, checkpoint_every=max(sizes.steps, 1), seed=seed,
                            output_dir=output_dir, progress=progress, **training)
    Trainer(model, corpora.training, config, options).train(resume=False)
    entities = list(world.memory_only)
    documents = ([world.texts[entity] for entity in entities], world.images[entities], world.codes[entities])
    evaluation = {}
    for configuration, (corpus, count) in {"k2": (corpora.memory, MAX_RETRIEVED),
                                           "k2_cut_memory": (corpora.training, MAX_RETRIEVED),
                                           "k0": (corpora.memory, 0)}.items():
        by_text = evaluate_main_loss(model, corpus, *documents, "text", count, options)
        by_image = evaluate_main_loss(model, corpus, *documents, "image", count, options)
        evaluation[configuration] = {"image": by_text["image"], "text": by_image["text"]}
    return evaluation, time.perf_counter() - started


def entity_claims(per_seed: list[dict], codebook: int) -> list[dict]:
    """The rows: retrieval lowers image and caption NLL (K=2 vs K=0), from the entity's own document
    (K=2 full memory vs a memory without the memory-only entities), and against what no model
    without the memory can beat."""
    def values(configuration: str, part: str) -> list[float]:
        return [seed[configuration][part] for seed in per_seed]

    loss = {"higher_is_better": False, "unit": " nats"}
    rows = []
    for part, what in (("image", "image-token NLL"), ("text", "caption-token NLL")):
        rows.append(paired_claim(PAPER, f"mechanism: retrieval lowers {what} on entities only the memory "
                                 "holds (random-code images, exact retriever)", ARMS,
                                 values("k2", part), values("k0", part), **loss))
    rows.append(paired_claim(PAPER, "mechanism: the image gain comes from the entity's own document",
                             "RA-CM3 K=2, full memory vs memory without those entities",
                             values("k2", "image"), values("k2_cut_memory", "image"), **loss))
    uniform = math.log(codebook)
    rows.append(paired_claim(PAPER, f"mechanism: K=2 image-token NLL below ln {codebook} = {uniform:.3f}, "
                             "the least any model without the memory can expect", "RA-CM3 K=2 vs that bound",
                             values("k2", "image"), [uniform] * len(per_seed), **loss))
    return rows


def summary_of(world: EntityWorld, corpora: EntityCorpora, sizes: EntitySizes, per_seed: list[dict]) -> dict:
    """What results.json records: sizes, retrieval's own-document rates, per-seed losses, means."""

    def mean(configuration: str, part: str) -> float:
        return sum(seed[configuration][part] for seed in per_seed) / len(per_seed)

    return {"sizes": sizes.__dict__, "vocabulary_size": len(corpora.vocabulary),
            "own_document_retrieved_at_2": {part: own_document_rate(corpora.memory, world, part)
                                            for part in ("text", "image")},
            "uniform_image_nll": math.log(sizes.codebook),
            "means": {configuration: {part: mean(configuration, part) for part in ("image", "text")}
                      for configuration in per_seed[0]},
            "per_seed": per_seed}


def output_dir_for(root: str, seed: int) -> str:
    return os.path.join(root, f"seed_{seed}", "entities")
