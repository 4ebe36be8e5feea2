"""The RA-CM3 digits demo: its class split, text-only documents, threshold calibration, judge and claims."""

import json
import math
import os

import pytest
import torch

from mkfast.claims import CONTROL_HOLDS, REPRODUCED
from mkfast.data.digits import (
    ImageCaptionSplit,
    caption_digit,
    digit_caption,
    load_digits_pairs,
    select_classes,
)
from mkfast.data.judge import DigitJudge, judge_features, kernel_distance
from mkfast.racm3.inference import NONSENSE_LABELS
from mkfast.racm3.knowledge import (
    MEMORY_ONLY_CLASSES,
    SEEN_CLASSES,
    TrainingCorpus,
    calibrate_threshold,
    same_class_cosines,
    text_only_documents,
)
from mkfast.racm3.retrieval import IGNORE, ROLE_RETRIEVED, SequenceOptions
from mkfast.racm3.vocabulary import PART_IMAGE, CM3Vocabulary


@pytest.fixture(scope="module")
def digits():
    return load_digits_pairs(image_size=16, seed=0)


def test_the_class_split_keeps_only_the_named_digits_in_order(digits):
    train, _ = digits
    seen = select_classes(train, SEEN_CLASSES)
    assert set(seen.labels.tolist()) == set(SEEN_CLASSES)
    assert not set(SEEN_CLASSES) & set(MEMORY_ONLY_CLASSES)
    assert set(SEEN_CLASSES) | set(MEMORY_ONLY_CLASSES) == set(range(10))
    rows = [row for row, label in enumerate(train.labels.tolist()) if label in SEEN_CLASSES]
    assert torch.equal(seen.images, train.images[rows])
    assert seen.captions == [train.captions[row] for row in rows]
    assert all(caption_digit(caption) == int(label)
               for caption, label in zip(seen.captions, seen.labels, strict=True))
    with pytest.raises(ValueError, match="digits 0..9"):
        select_classes(train, (3, 12))


def test_caption_digit_reads_the_named_digit():
    assert caption_digit("a handwritten digit eight") == 8
    assert caption_digit("A handwritten digit Seven.") == 7
    assert caption_digit("a handwritten digit X") is None


def test_text_only_documents_name_every_digit_and_the_k_shot_labels():
    texts = text_only_documents(repeats=2)
    assert len(texts) == 2 * (10 + len(NONSENSE_LABELS))
    for label in range(10):
        assert texts.count(digit_caption(label)) == 2
    assert all(label in texts for label in NONSENSE_LABELS)


def _toy_corpus(count: int = 12):
    captions = [digit_caption(label) for label in range(10)] + list(NONSENSE_LABELS)
    vocabulary = CM3Vocabulary.from_corpus(captions, 16, 280)
    labels = torch.arange(count) % 3
    codes = torch.randint(0, 16, (count, 2, 2), generator=torch.Generator().manual_seed(0))
    return vocabulary, labels, codes


def test_training_corpus_trains_text_only_documents_without_retrieval_or_images():
    vocabulary, labels, codes = _toy_corpus()
    texts = [digit_caption(int(label)) for label in labels]

    class Encoder:  # text queries: a fixed embedding per caption; never asked for images here
        def encode_documents(self, texts, images):
            return torch.nn.functional.normalize(torch.eye(len(texts), 8), dim=-1)

        def encode_texts(self, texts, drop_fraction=0.0, generator=None):
            return torch.nn.functional.normalize(torch.ones(len(texts), 8), dim=-1)

        def encode_images(self, images, drop_fraction=0.0, generator=None):
            return torch.nn.functional.normalize(torch.ones(images.shape[0], 8), dim=-1)

    corpus = TrainingCorpus(vocabulary, Encoder(), texts, torch.zeros(len(texts), 3, 4, 4), codes,
                            text_only_documents(repeats=1))
    assert len(corpus) == len(texts) + 12 and len(corpus.memory) == len(texts)
    options = SequenceOptions(max_retrieved=2, mask_probability=0.0, max_sequence_length=256)
    text_rows = list(range(len(texts), len(corpus)))
    batch = corpus.training_batch(text_rows, options, torch.Generator().manual_seed(0))
    assert batch.retrieved == [[] for _ in text_rows]
    targets = batch.labels != IGNORE
    assert not bool((targets & (batch.target_parts == PART_IMAGE)).any())
    assert not bool((targets & (batch.target_roles == ROLE_RETRIEVED)).any())
    # Image documents still retrieve (K ~ U{0, 1, 2}, never themselves) over many draws.
    batch = corpus.training_batch(list(range(len(texts))) * 4, options, torch.Generator().manual_seed(1))
    examples = list(range(len(texts))) * 4
    retrieved = [(example, row) for example, rows in zip(examples, batch.retrieved, strict=True)
                 for row in rows]
    assert retrieved and all(example != row for example, row in retrieved)


def test_threshold_calibration_keeps_same_class_neighbours_and_removes_near_copies():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    labels = torch.arange(40) % 4
    noise = 0.3 * torch.randn(40, 16, generator=generator)
    embeddings = torch.nn.functional.normalize(centres[labels] + noise, dim=-1)
    threshold = calibrate_threshold(embeddings, labels)
    cosines = same_class_cosines(embeddings, labels)
    assert cosines.numel() == 4 * (10 * 9 // 2)
    assert float((cosines <= threshold).double().mean()) >= 0.98  # same-class neighbours stay
    copy = torch.nn.functional.normalize(embeddings[0] + 1e-3 * torch.randn(16, generator=generator), dim=-1)
    assert float(copy @ embeddings[0]) > threshold  # a near-copy is filtered
    with pytest.raises(ValueError, match="no two documents share a class"):
        calibrate_threshold(embeddings[:4], labels[:4])


def test_judge_reads_real_digits_and_not_noise(digits):
    train, held_out = digits
    judge = DigitJudge(train.images, train.labels)
    assert judge_features(held_out.images).shape == (len(held_out), 64)
    assert judge.accuracy(held_out.images, held_out.labels) > 0.9
    noise = torch.rand(50, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert judge.accuracy(noise, torch.arange(50) % 10) < 0.4
    assert math.isnan(judge.accuracy(held_out.images[:0], []))


def test_kernel_distance_is_near_zero_for_one_distribution_and_large_across(digits):
    train, held_out = digits
    ones, sevens = select_classes(held_out, (1,)), select_classes(held_out, (7,))
    same = kernel_distance(select_classes(train, (1,)).images, ones.images)
    across = kernel_distance(ones.images, sevens.images)
    assert abs(same) < 0.2 * across
    with pytest.raises(ValueError, match="at least 2 images"):
        kernel_distance(ones.images[:1], sevens.images)


def _fake_loss_seed(gain: float) -> dict:
    retrieval = {group: {"k2": {"image": 1.0 - gain, "text": 0.5 - gain},
                         "k2_seen_memory": {"image": 1.0, "text": 0.5}, "k0": {"image": 1.0, "text": 0.5}}
                 for group in ("memory_only", "seen")}
    plain = {group: {"k0": {"image": 1.0, "text": 0.5}} for group in ("memory_only", "seen")}
    return {"retrieval": retrieval, "no_retrieval": plain}


def test_loss_claims_pair_the_seeds_and_give_verdicts():
    from mkfast.racm3.demo import loss_claims

    rows = loss_claims([_fake_loss_seed(gain) for gain in (0.2, 0.3, 0.25)])
    first = rows[0]
    assert first["paper"] == "RA-CM3" and first["seeds"] == 3 and first["verdict"] == REPRODUCED
    assert first["treatment"] == [0.8, 0.7, 0.75] and first["measured"].startswith("-0.250")
    control = next(row for row in rows if "cut to digits 0-6, image" in row["claim"])
    assert control["verdict"] == CONTROL_HOLDS  # no gain: the interval is [0, 0]


def test_inference_claims_cover_the_three_claims():
    from mkfast.racm3.inference_demo import CONFIGURATIONS, inference_claims

    def seed(value: float) -> dict:
        task = {"text_to_image": {"judge_accuracy_best": value}, "image_to_text": {"class_accuracy": value}}
        result = {name: {"memory_only": task, "seen": task} for name in CONFIGURATIONS}
        result["cm3_k0"] = {"memory_only": {"text_to_image": {"judge_accuracy_best": 0.0},
                                            "image_to_text": {"class_accuracy": 0.0}}, "seen": task}
        return result | {"k_shot": {"ensemble_accuracy": {1: value - 0.1, 8: value}}}

    rows = inference_claims([seed(0.7), seed(0.75), seed(0.8)], (1, 8))
    claims = {row["claim"]: row for row in rows}
    for claim in ("retrieval improves image generation on knowledge held only in memory",
                  "retrieval improves captioning on knowledge held only in memory",
                  "k-shot in-context accuracy improves with k", "k-shot in-context accuracy beats chance"):
        assert claims[claim]["verdict"] == REPRODUCED, claims[claim]
    seen_control = claims["control: seen digits, captioning (agree within noise expected)"]
    assert seen_control["verdict"] == CONTROL_HOLDS
    assert json.loads(json.dumps(rows)) == rows


@pytest.mark.slow
def test_quick_demo_trains_every_seed_and_reports_claims(tmp_path):
    from mkfast.racm3.demo import QUICK, run_demo
    from mkfast.racm3.inference_demo import load_demo_run

    summary = run_demo(str(tmp_path), quick=True)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["seeds"] == list(QUICK.seeds) and 0 < summary["threshold"] <= 1
    for seed in QUICK.seeds:
        for name in ("retrieval", "no_retrieval"):
            assert os.path.exists(tmp_path / f"seed_{seed}" / name / "metrics.jsonl")
    for name in ("retrieval", "no_retrieval"):
        assert 0 < summary["runs"][name]["held_out_image_token_loss"] < math.log(summary["vocabulary_size"])
    assert all(row["seeds"] == len(QUICK.seeds) for row in summary["claims"])
    # The no-retrieval run never saw a retrieved token; the retrieval run did.
    records = {name: [json.loads(line) for line in
                      (tmp_path / "seed_0" / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("retrieval", "no_retrieval")}
    assert sum(record["retrieved_tokens"] for record in records["retrieval"]) > 0
    assert sum(record["retrieved_tokens"] for record in records["no_retrieval"]) == 0
    run = load_demo_run(str(tmp_path))
    assert len(run["memory"]) == len(run["train"]) > len(run["training"].texts)
    assert set(MEMORY_ONLY_CLASSES) <= set(run["train"].labels.tolist())  # the memory holds every digit
    assert not set(caption_digit(text) for text in run["training"].texts) & set(MEMORY_ONLY_CLASSES)


def test_tied_generator_un_embeds_with_its_embedding_matrix():
    from mkfast.racm3.generator import GeneratorConfig, build_generator

    config = GeneratorConfig(hidden_size=32, num_layers=1, num_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_sequence_length=16, tie_word_embeddings=True)
    model = build_generator(50, config)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = build_generator(50, GeneratorConfig(**{**config.__dict__, "tie_word_embeddings": False}))
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_generators_in_worker_processes_give_the_in_process_results(tmp_path):
    from dataclasses import replace

    from mkfast.racm3.demo import QUICK, run_demo

    sizes = replace(QUICK, vq_steps=2, clip_steps=2, generator_steps=3, batch_size=4, held_out_documents=4)
    one, two = (run_demo(str(tmp_path / f"workers_{workers}"), sizes=sizes, workers=workers)
                for workers in (1, 2))
    assert one["per_seed"] == two["per_seed"] and len(one["per_seed"]) == len(QUICK.seeds)
    assert one["claims"] == two["claims"]


def test_image_caption_split_indexing():
    split = ImageCaptionSplit(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]), ["a", "b"])
    assert len(split) == 2 and split[1][1] == "b"
