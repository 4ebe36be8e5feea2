"""RA-CM3's mechanism check: entities whose random-code images only the memory holds."""

import math

import pytest
import torch

from mkfast.claims import NOT_REPRODUCED, REPRODUCED
from mkfast.racm3 import entity_memory
from mkfast.racm3.entity_memory import (
    EntitySizes,
    entity_claims,
    make_world,
    own_document_rate,
    twin_corpus,
    vocabulary_of,
)
from mkfast.racm3.retrieval import RETRIEVAL_THRESHOLD, SequenceOptions

SMALL = EntitySizes(trained=12, memory_only=6, steps=2)


def test_a_world_has_distinct_names_random_images_and_is_fixed_by_its_seed():
    world = make_world(SMALL, seed=3)
    assert len(set(world.texts)) == len(world.texts) == SMALL.trained + SMALL.memory_only
    assert world.codes.shape == (18, SMALL.grid, SMALL.grid) and int(world.codes.max()) < SMALL.codebook
    assert list(world.memory_only) == list(range(12, 18))
    again, other = make_world(SMALL, seed=3), make_world(SMALL, seed=4)
    assert again.texts == world.texts and torch.equal(again.codes, world.codes)
    assert other.texts != world.texts
    with pytest.raises(ValueError, match="distinct names"):
        make_world(EntitySizes(trained=2000, memory_only=0, steps=1), seed=0)


def test_every_name_is_one_token_per_syllable():
    world = make_world(SMALL, seed=0)
    vocabulary = vocabulary_of(world, SMALL.codebook)
    for text in world.texts:
        assert len(vocabulary.encode_text(text)) == entity_memory.NAME_SYLLABLES


def test_the_exact_retriever_finds_each_memory_only_entity_through_the_filter():
    world = make_world(SMALL, seed=0)
    memory = twin_corpus(world, vocabulary_of(world, SMALL.codebook), range(len(world.texts)))
    assert len(memory) == 2 * len(world.texts)
    for part in ("text", "image"):
        assert own_document_rate(memory, world, part) == 1.0
    # A twin scores 1.0 with its copy, so RA-CM3's filter keeps one of the two; a caption query
    # scores ~0.71 with its document and passes.
    entities = list(world.memory_only)
    retrieved = memory.retrieve([world.texts[e] for e in entities], world.images[entities],
                                ["text"] * len(entities), [2] * len(entities),
                                SequenceOptions(query_dropout=0.0, threshold=RETRIEVAL_THRESHOLD),
                                torch.Generator().manual_seed(0))
    for entity, rows in zip(entities, retrieved, strict=True):
        assert len(rows) == 2 and sum(memory.texts[row] == world.texts[entity] for row in rows) == 1


def test_the_cut_memory_does_not_hold_the_memory_only_entities():
    world = make_world(SMALL, seed=0)
    cut = twin_corpus(world, vocabulary_of(world, SMALL.codebook), range(world.trained))
    assert own_document_rate(cut, world, "text") == 0.0


def test_training_retrieves_the_twin_never_the_example_itself():
    world = make_world(SMALL, seed=0)
    training = twin_corpus(world, vocabulary_of(world, SMALL.codebook), range(world.trained))
    examples = list(range(len(training)))
    retrieved = training.retrieve([training.texts[row] for row in examples], training.images[examples],
                                  ["text"] * len(examples), [1] * len(examples),
                                  SequenceOptions(query_dropout=0.0), torch.Generator().manual_seed(0),
                                  exclude=examples)
    twins = [(row + world.trained) % len(training) for row in examples]
    assert [rows[0] for rows in retrieved] == twins


def test_entity_claims_judge_the_gain_against_k0_the_cut_memory_and_the_bound():
    def seed(k2: float) -> dict:
        return {"k2": {"image": k2, "text": k2 / 2}, "k2_cut_memory": {"image": 6.0, "text": 5.0},
                "k0": {"image": 5.9, "text": 4.8}}

    rows = entity_claims([seed(0.3), seed(0.4), seed(0.35)], codebook=128)
    assert len(rows) == 4 and all(row["verdict"] == REPRODUCED for row in rows)
    assert math.log(128) - 0.35 == pytest.approx(-float(rows[3]["measured"].split()[0]), abs=1e-3)
    failed = entity_claims([seed(6.1), seed(6.2), seed(6.3)], codebook=128)
    assert failed[0]["verdict"] == NOT_REPRODUCED and failed[3]["verdict"] == NOT_REPRODUCED


def test_a_short_run_reports_every_configuration(tmp_path):
    world = make_world(SMALL, seed=0)
    from mkfast.racm3.demo import QUICK

    training = {"batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 1}
    corpora = entity_memory.build_corpora(world, SMALL.codebook)
    evaluation, seconds = entity_memory.train_and_evaluate(world, corpora, SMALL, QUICK.generator, training,
                                                           0, str(tmp_path))
    assert set(evaluation) == {"k2", "k2_cut_memory", "k0"} and seconds > 0
    assert all(0 < value[part] < 10 for value in evaluation.values() for part in ("image", "text"))
    assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_generator_learns_to_draw_entities_only_the_memory_holds(tmp_path):
    """The full demo's seed 0, one thread: if retrieval, the sequences or the loss break, the
    generator cannot beat ln(128) on entities it never trained on."""
    from mkfast.parallel import one_thread
    from mkfast.racm3.demo import FULL

    with one_thread():
        world = make_world(FULL.entities, seed=0)
        training = {"batch_size": FULL.batch_size, "learning_rate": FULL.learning_rate,
                    "warmup_steps": FULL.warmup_steps}
        corpora = entity_memory.build_corpora(world, FULL.entities.codebook)
        evaluation, _ = entity_memory.train_and_evaluate(world, corpora, FULL.entities, FULL.generator,
                                                         training, 0, str(tmp_path))
    bound = math.log(FULL.entities.codebook)
    assert evaluation["k0"]["image"] > bound - 0.1, evaluation
    assert evaluation["k2"]["image"] < 1.5, f"retrieval brought the entity's document, yet {evaluation}"
    assert evaluation["k2_cut_memory"]["image"] > bound - 0.1, evaluation

