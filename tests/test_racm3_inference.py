"""RA-CM3 inference: the sampling engine (KV cache, top-k/top-p, image-code constraint, CFG) and the tasks.

Everything runs on tiny models built from config (a 2-layer Llama over a
~280-id vocabulary, a 4x4-code VQGAN, a 1-layer CLIP); nothing is trained here
except where a test makes a model prefer something on purpose.
"""

from __future__ import annotations

import math

import pytest
import torch

from mkfast.racm3.generator import GeneratorConfig, build_generator
from mkfast.racm3.sampling import (
    ImageCodeConstraint,
    SamplingOptions,
    filter_logits,
    generate,
    guided_logits,
)
from mkfast.racm3.vocabulary import IMAGE_CLOSE, IMAGE_OPEN, IMAGE_SOURCE, CM3Vocabulary

CAPTIONS = [f"a handwritten digit {name}" for name in ("zero", "one", "two", "three", "four", "five")]
CODEBOOK = 16
CODES_PER_SIDE = 4  # 4x4 grid: decodable by the tiny VQGAN below (8x8 pixels, f=2)
GRID = CODES_PER_SIDE * CODES_PER_SIDE
TINY_GENERATOR = GeneratorConfig(hidden_size=32, num_layers=2, num_heads=2, num_key_value_heads=1,
                                 intermediate_size=64, max_sequence_length=256)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread buys nothing, and on a busy 2-core machine thread
    oversubscription made a decode step 57x slower (1.4 ms -> 80 ms, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocabulary() -> CM3Vocabulary:
    return CM3Vocabulary.from_corpus(CAPTIONS, CODEBOOK, text_vocabulary_size=270)


@pytest.fixture(scope="module")
def model(vocabulary):
    torch.manual_seed(1)
    return build_generator(len(vocabulary), TINY_GENERATOR, pad_token_id=vocabulary.pad_id).eval()


def caption_prompt(vocabulary: CM3Vocabulary, caption: str, samples: int) -> torch.Tensor:
    """``</doc> <img alt= caption src=`` repeated over ``samples`` rows: (samples, T)."""
    special = vocabulary.special_ids
    ids = [vocabulary.separator_id, special[IMAGE_OPEN], *vocabulary.encode_text(caption),
           special[IMAGE_SOURCE]]
    return torch.tensor(ids).unsqueeze(0).expand(samples, -1)


# ----------------------------------------------------------------------------- sampling
def test_fixed_seed_sampling_is_deterministic_and_seed_dependent(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[2], samples=3)
    options = SamplingOptions(temperature=1.0, top_k=50, top_p=0.95)
    first = generate(model, prompt, 12, options, seed=7)
    second = generate(model, prompt, 12, options, seed=7)
    other = generate(model, prompt, 12, options, seed=8)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Rows of one batch are different samples, not copies of one.
    assert not torch.equal(first[0], first[1])


def test_kv_cache_decoding_matches_recomputing_the_prefix(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[1], samples=2)
    greedy = SamplingOptions(temperature=0.0)
    cached = generate(model, prompt, 10, greedy, use_cache=True)
    recomputed = generate(model, prompt, 10, greedy, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_kv_cache_decoding_uses_no_deprecated_transformers_argument(model, vocabulary):
    # transformers 5.x warns on the old ``past_key_values`` keyword; the stream uses the one the
    # installed model's forward takes, so the warning (an error here) never fires.
    from mkfast.racm3.sampling import DecodingStream

    stream = DecodingStream(model, caption_prompt(vocabulary, "a digit", samples=2))
    stream.append(torch.tensor([5, 6]))
    assert stream.logits.shape[0] == 2


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    # Nucleus: the mass before a token must be < top_p for it to stay.
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False],
                                                                         [False, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False],
                                                                          [False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum().item() == 2  # the top token per row


def test_top_k_one_equals_greedy(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[0], samples=2)
    greedy = generate(model, prompt, 8, SamplingOptions(temperature=0.0))
    top_one = generate(model, prompt, 8, SamplingOptions(temperature=1.3, top_k=1), seed=3)
    assert torch.equal(greedy, top_one)


def test_image_constraint_always_yields_a_decodable_grid(model, vocabulary):
    from mkfast.racm3.image_tokenizer import VQGAN, VQGANConfig

    tokenizer = VQGAN(VQGANConfig(resolution=8, base_channels=32, channel_multipliers=(1, 1),
                                  num_res_blocks=1, attention_resolutions=(), z_channels=32,
                                  embedding_dim=8, codebook_size=CODEBOOK)).eval()
    prompt = caption_prompt(vocabulary, CAPTIONS[3], samples=4)
    close_id = vocabulary.special_ids[IMAGE_CLOSE]
    for seed in range(3):
        # Extra tokens after the image: the constraint must also forbid stray codes there.
        constraint = ImageCodeConstraint(vocabulary, GRID)
        tokens = generate(model, prompt, GRID + 6, SamplingOptions(temperature=1.5), seed=seed,
                          constraint=constraint)
        assert bool((tokens[:, :GRID] >= vocabulary.image_offset).all())
        assert bool((tokens[:, GRID] == close_id).all())
        assert not bool((tokens[:, GRID + 1:] >= vocabulary.image_offset).any())
        codes = torch.stack([vocabulary.decode_image(row[:GRID].tolist()) for row in tokens])
        images = tokenizer.decode(codes.view(-1, CODES_PER_SIDE, CODES_PER_SIDE))
        assert images.shape == (4, 3, 8, 8)


def test_image_constraint_counts_codes_already_in_the_prompt(vocabulary):
    constraint = ImageCodeConstraint(vocabulary, GRID)
    source = vocabulary.special_ids[IMAGE_SOURCE]
    image = vocabulary.image_offset
    separator = vocabulary.separator_id
    constraint.start(torch.tensor([[separator] * (GRID - 5) + [source] + [image] * 5,
                                   [source] + [image] * GRID,
                                   [source] + [image] * GRID + [vocabulary.special_ids[IMAGE_CLOSE]]][:2]
                                  + [[separator] * (GRID + 1)]))
    assert constraint.remaining.tolist() == [GRID - 5, 0, -1]
    allowed = constraint.allowed()
    assert bool(allowed[0, image:].all()) and not bool(allowed[0, :image].any())
    assert allowed[1].nonzero().flatten().tolist() == [vocabulary.special_ids[IMAGE_CLOSE]]
    assert not bool(allowed[2, image:].any()) and bool(allowed[2, :image].all())


def test_guidance_scale_one_equals_plain_sampling(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[4], samples=3)
    unconditional = caption_prompt(vocabulary, "", samples=3)  # "<img alt= src=": no caption
    options = SamplingOptions(temperature=1.0, top_p=0.9)
    plain = generate(model, prompt, GRID + 1, options, seed=5,
                     constraint=ImageCodeConstraint(vocabulary, GRID))
    guided = generate(model, prompt, GRID + 1, options, seed=5,
                      constraint=ImageCodeConstraint(vocabulary, GRID),
                      unconditional_prompt_ids=unconditional, guidance_scale=1.0)
    assert torch.equal(plain, guided)
    stronger = generate(model, prompt, GRID + 1, options, seed=5,
                        constraint=ImageCodeConstraint(vocabulary, GRID),
                        unconditional_prompt_ids=unconditional, guidance_scale=4.0)
    assert not torch.equal(plain, stronger)


def test_guided_first_step_is_greedy_over_mixed_logits(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[5], samples=1)
    unconditional = caption_prompt(vocabulary, "", samples=1)
    with torch.no_grad():
        conditioned = model(input_ids=prompt).logits[:, -1].float()
        unconditioned = model(input_ids=unconditional).logits[:, -1].float()
    scale = 3.0
    expected_logits = unconditioned + scale * (conditioned - unconditioned)
    torch.testing.assert_close(guided_logits(conditioned, unconditioned, scale), expected_logits)
    first = generate(model, prompt, 1, SamplingOptions(temperature=0.0),
                     unconditional_prompt_ids=unconditional, guidance_scale=scale)
    assert first.item() == int(expected_logits.argmax())


def test_rows_stop_at_the_stop_token_and_are_padded_after(model, vocabulary):
    prompt = caption_prompt(vocabulary, CAPTIONS[0], samples=4)
    stop = vocabulary.separator_id
    # Make the stop token likely enough to appear in some rows but not instantly everywhere.
    allowed = torch.zeros(len(vocabulary), dtype=torch.bool)
    allowed[[stop, *range(vocabulary.text_offset, vocabulary.text_offset + 3)]] = True
    tokens = generate(model, prompt, 30, SamplingOptions(temperature=1.0), seed=1, allowed=allowed,
                      stop_token_id=stop, pad_token_id=vocabulary.pad_id)
    assert bool(torch.isin(tokens, torch.tensor([stop, vocabulary.pad_id, *range(vocabulary.text_offset,
                                                 vocabulary.text_offset + 3)])).all())
    stopped = 0
    for row in tokens.tolist():
        if stop in row:
            stopped += 1
            assert all(token == vocabulary.pad_id for token in row[row.index(stop) + 1:])
    assert stopped > 0
    late = generate(model, prompt, 30, SamplingOptions(temperature=1.0), seed=1, allowed=allowed,
                    stop_token_id=stop, pad_token_id=vocabulary.pad_id, min_new_tokens=5)
    assert not bool((late[:, :5] == stop).any())


def test_bad_sampling_options_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1.0)


# ----------------------------------------------------------------------------- tasks
@pytest.fixture(scope="module")
def pipeline(vocabulary, model):
    from mkfast.racm3.encoder import MixedModalEncoder, SmallCLIPConfig, build_small_clip
    from mkfast.racm3.image_tokenizer import VQGAN, VQGANConfig
    from mkfast.racm3.inference import RACM3Inference
    from mkfast.racm3.retrieval import RetrievalCorpus

    torch.manual_seed(2)
    tokenizer = VQGAN(VQGANConfig(resolution=8, base_channels=32, channel_multipliers=(1, 1),
                                  num_res_blocks=1, attention_resolutions=(), z_channels=32,
                                  embedding_dim=8, codebook_size=CODEBOOK)).eval()
    encoder = MixedModalEncoder(build_small_clip(SmallCLIPConfig(vision_layers=1, text_layers=1))).eval()
    images = torch.rand(len(CAPTIONS), 3, 8, 8)
    corpus = RetrievalCorpus(vocabulary, encoder, CAPTIONS, images, tokenizer.encode(images))
    return RACM3Inference(model, corpus, tokenizer)


def test_text_to_image_samples_reranks_by_clip_score_and_is_seeded(pipeline):
    from mkfast.racm3.metrics import clip_scores

    result = pipeline.text_to_image(CAPTIONS[1], k=2, num_samples=3, seed=4)
    assert result.images.shape == (3, 3, 8, 8) and result.codes.shape == (3, CODES_PER_SIDE, CODES_PER_SIDE)
    assert 1 <= len(result.retrieved) <= 2
    assert result.scores.tolist() == sorted(result.scores.tolist(), reverse=True)
    torch.testing.assert_close(clip_scores(pipeline.encoder, result.images, [CAPTIONS[1]] * 3), result.scores)
    torch.testing.assert_close(pipeline.image_tokenizer.decode(result.codes), result.images)
    again = pipeline.text_to_image(CAPTIONS[1], k=2, num_samples=3, seed=4)
    assert torch.equal(again.codes, result.codes)
    without = pipeline.text_to_image(CAPTIONS[1], k=0, num_samples=2, seed=4, guidance_scale=2.0)
    assert without.retrieved == [] and without.images.shape == (2, 3, 8, 8)


def test_prompts_prepend_retrieved_documents_like_training(pipeline, vocabulary):
    documents = [pipeline.corpus.documents[row] for row in (2, 0)]
    ids = pipeline.context_ids(documents)
    separator = vocabulary.separator_id
    expected = ([separator] + documents[0].token_ids.tolist() + [separator]
                + documents[1].token_ids.tolist() + [separator])
    assert ids == expected
    assert pipeline.context_ids([]) == [separator]


def _train_to_prefer(model, sequence: list[int], steps: int = 40):
    """A copy of ``model`` trained on one sequence until it prefers it."""
    import copy

    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    input_ids = torch.tensor(sequence).unsqueeze(0)
    for _ in range(steps):
        loss = trained(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return trained.eval()


def test_perplexity_reranking_picks_the_true_caption_among_candidates(pipeline, vocabulary):
    from mkfast.racm3.inference import RACM3Inference

    image = pipeline.corpus.images[3]
    codes = pipeline.image_tokenizer.encode(image.unsqueeze(0))[0]
    true_caption = CAPTIONS[3]
    sequence = ([vocabulary.separator_id] + pipeline._infill_caption_prefix(codes)
                + vocabulary.encode_text(true_caption) + [vocabulary.separator_id])
    preferring = RACM3Inference(_train_to_prefer(pipeline.model, sequence), pipeline.corpus,
                                pipeline.image_tokenizer)
    candidates = [CAPTIONS[0], CAPTIONS[5], true_caption, CAPTIONS[2]]
    ranked, values = preferring.rerank_captions(codes, candidates)
    assert ranked[0] == true_caption
    assert values == sorted(values) and len(ranked) == len(candidates)
    # End to end: sampled candidates, reranked; the preferred caption comes out.
    result = preferring.image_to_text(image, k=0, num_captions=4, seed=0,
                                      options=SamplingOptions(temperature=0.7))
    assert result.caption == true_caption
    assert result.perplexities == sorted(result.perplexities) and result.candidates[0] == result.caption


def test_image_to_text_with_retrieval_returns_text_candidates(pipeline):
    result = pipeline.image_to_text(pipeline.corpus.images[0], k=2, num_captions=3, seed=1,
                                    max_caption_tokens=6)
    assert 1 <= len(result.retrieved) <= 2
    assert 1 <= len(result.candidates) <= 3 and result.caption == result.candidates[0]
    assert all(isinstance(candidate, str) for candidate in result.candidates)


def test_infilling_changes_only_the_masked_region_and_uses_given_context(pipeline, vocabulary):
    codes = pipeline.corpus.codes[1]
    region = torch.zeros_like(codes, dtype=torch.bool)
    region[1, 1:3] = True
    region[3, 0] = True  # two runs in raster order -> <mask:0>, <mask:1>
    context = [pipeline.corpus.documents[4]]
    filled, images = pipeline.infill_image(codes, region, text=CAPTIONS[1], context_documents=context,
                                           num_samples=3, seed=2, options=SamplingOptions(temperature=2.0))
    assert filled.shape == (3, *codes.shape) and images.shape == (3, 3, 8, 8)
    assert bool((filled[:, ~region] == codes[~region]).all())
    assert bool(((filled >= 0) & (filled < CODEBOOK)).all())
    assert not bool((filled[:, region] == filled[0, region]).all())  # samples differ at temperature 2
    again, _ = pipeline.infill_image(codes, region, text=CAPTIONS[1], context_documents=context,
                                     num_samples=3, seed=2, options=SamplingOptions(temperature=2.0))
    assert torch.equal(filled, again)
    with pytest.raises(ValueError, match="region"):
        pipeline.infill_image(codes, torch.zeros_like(region), text=CAPTIONS[1])


def test_k_shot_ensemble_averages_exactly_the_per_prompt_probabilities(pipeline):
    query = pipeline.corpus.codes[0]
    pairs = [(pipeline.demonstration(pipeline.corpus.codes[x], "a handwritten digit X"),
              pipeline.demonstration(pipeline.corpus.codes[y], "a handwritten digit Y"))
             for x, y in ((1, 2), (3, 4), (5, 1))]
    ensemble = pipeline.classify_ensemble(query, pairs)
    separately = torch.stack([pipeline.label_probabilities(query, list(pair)) for pair in pairs])
    assert torch.equal(ensemble.per_prompt, separately)
    assert torch.equal(ensemble.probabilities, separately.mean(dim=0))
    assert float(ensemble.probabilities.sum()) == pytest.approx(1.0)
    assert ensemble.prediction == int(separately.mean(dim=0).argmax())
    # The plain variant puts every demonstration in one prompt: a different number in general.
    single = pipeline.classify_single_prompt(query, [document for pair in pairs for document in pair])
    torch.testing.assert_close(single.probabilities,
                               pipeline.label_probabilities(query, [d for pair in pairs for d in pair]))
    assert single.per_prompt.shape == (1, 2)


def test_save_images_writes_pngs(tmp_path):
    from PIL import Image

    from mkfast.racm3.inference import save_images

    paths = save_images(torch.rand(2, 3, 8, 8), str(tmp_path), "sample")
    assert [Image.open(path).size for path in paths] == [(8, 8), (8, 8)]


# ----------------------------------------------------------------------------- demo and commands
@pytest.fixture(scope="module")
def fake_demo_run(tmp_path_factory):
    """A directory laid out like the RA-CM3 demo's output, untrained components (no training in tests)."""
    import json
    from dataclasses import asdict

    demo = pytest.importorskip("mkfast.racm3.demo")
    from mkfast.data.digits import load_digits_pairs
    from mkfast.racm3.encoder import MixedModalEncoder, build_small_clip
    from mkfast.racm3.image_tokenizer import VQGAN
    from mkfast.racm3.inference_demo import COMPONENTS_FILE, TRAINED_SEQUENCE_LENGTH
    from mkfast.racm3.knowledge import MEMORY_ONLY_CLASSES, SEEN_CLASSES, text_only_documents

    directory = tmp_path_factory.mktemp("racm3_demo")
    torch.manual_seed(0)
    train, _ = load_digits_pairs(image_size=demo.IMAGE_SIZE, seed=0)
    vocabulary = CM3Vocabulary.from_corpus(train.captions + text_only_documents(1),
                                           demo.DEMO_VQ.codebook_size, demo.DEMO_TEXT_VOCABULARY)
    encoder = MixedModalEncoder(build_small_clip(demo.DEMO_CLIP))
    torch.save({"vq": VQGAN(demo.DEMO_VQ).state_dict(), "clip": encoder.clip.state_dict(),
                "vocabulary": vocabulary.to_json()}, directory / COMPONENTS_FILE)
    config = GeneratorConfig(max_sequence_length=TRAINED_SEQUENCE_LENGTH)
    for seed in (0, 1):
        for name in ("retrieval", "no_retrieval"):
            (directory / f"seed_{seed}" / name).mkdir(parents=True)
            model = build_generator(len(vocabulary), config, pad_token_id=vocabulary.pad_id)
            torch.save({"model": model.state_dict(), "config": {"seed": seed}},
                       directory / f"seed_{seed}" / name / "checkpoint_00000001.pt")
    (directory / "results.json").write_text(json.dumps({
        "quick": True, "vocabulary_size": len(vocabulary), "seeds": [0, 1], "data_seed": 0,
        "generator": asdict(config), "threshold": 0.99, "seen_classes": list(SEEN_CLASSES),
        "memory_only_classes": list(MEMORY_ONLY_CLASSES), "runs": {}}))
    return str(directory)


@pytest.mark.slow
def test_inference_demo_reports_every_configuration_claims_and_writes_the_grid(fake_demo_run, tmp_path):
    import os

    from mkfast.racm3.inference_demo import CONFIGURATIONS, InferenceSizes, run_inference_demo

    sizes = InferenceSizes(prompts_per_class=1, image_samples=2, images_per_class=1, caption_samples=2,
                           classification_queries=2, shots=(1, 2))
    summary = run_inference_demo(fake_demo_run, str(tmp_path), sizes=sizes)
    assert summary["seeds"] == [0, 1] and len(summary["per_seed"]) == 2
    for name in CONFIGURATIONS:
        memory_only = summary[name]["memory_only"]
        assert 0 <= memory_only["text_to_image"]["judge_accuracy_best"] <= 1
        assert 0 <= memory_only["image_to_text"]["class_accuracy"] <= 1
        assert math.isfinite(memory_only["text_to_image"]["kernel_distance"])
    assert set(summary["racm3_k2"]) == {"memory_only", "seen"}
    assert summary["judge"]["accuracy_real_held_out"] > 0.9  # the judge, unlike the models here, is fitted
    assert set(summary["k_shot"]["ensemble_accuracy"]) == {1, 2}
    assert {row["claim"] for row in summary["claims"]} >= {
        "retrieval improves image generation on knowledge held only in memory",
        "retrieval improves captioning on knowledge held only in memory",
        "k-shot in-context accuracy improves with k", "k-shot in-context accuracy beats chance"}
    assert all(row["seeds"] == 2 for row in summary["claims"])
    assert os.path.exists(tmp_path / "text_to_image_grid.png")
    assert os.path.exists(tmp_path / "inference_results.json")


@pytest.mark.slow
def test_generate_command_writes_results_and_pngs(fake_demo_run, tmp_path):
    import json

    from PIL import Image

    from mkfast.cli import main
    from mkfast.racm3.demo import IMAGE_SIZE

    main(["generate", "racm3", "--run-dir", fake_demo_run, "--caption", "a handwritten digit seven",
          "--samples", "2", "--retrieved", "2", "--top-k", "20", "--output-dir", str(tmp_path / "t2i")])
    record = json.loads((tmp_path / "t2i" / "results.json").read_text())
    assert record["task"] == "text_to_image" and len(record["images"]) == 2
    assert len(record["retrieved_texts"]) == len(record["retrieved"]) <= 2
    assert Image.open(record["images"][0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert (tmp_path / "t2i" / "grid.png").exists()
    main(["generate", "racm3", "--run-dir", fake_demo_run, "--image", record["images"][0], "--samples", "2",
          "--output-dir", str(tmp_path / "i2t")])
    caption = json.loads((tmp_path / "i2t" / "results.json").read_text())
    assert caption["task"] == "image_to_text" and caption["caption"] == caption["candidates"][0]


def test_load_pipeline_reads_a_training_command_run(tmp_path):
    from mkfast.racm3.commands import load_config, train_racm3
    from mkfast.racm3.inference_commands import load_pipeline

    config = load_config(None, {"training.output_dir": str(tmp_path), "data_limit": 24, "training.steps": 1,
                                "training.batch_size": 2, "vq_training.steps": 1, "clip_training.steps": 1})
    config.training.progress = False
    train_racm3(config)
    pipeline = load_pipeline(str(tmp_path))
    assert len(pipeline.corpus) == 24 and pipeline.codes_per_image == config.vq.codes_per_side ** 2
    result = pipeline.text_to_image("a handwritten digit one", k=1, num_samples=1)
    assert result.images.shape == (1, 3, config.image_size, config.image_size)


# ----------------------------------------------------------------------------- GPU (run where one exists)
@pytest.mark.cuda
def test_kv_cache_decoding_through_mkfast_decode_attention_matches_sdpa_on_cuda(vocabulary):
    from mkfast.layers.attention import register_transformers_attention
    from mkfast.racm3.sampling import DecodingStream

    register_transformers_attention()
    torch.manual_seed(3)
    config = GeneratorConfig(hidden_size=128, num_layers=2, num_heads=4, num_key_value_heads=2,
                             intermediate_size=256, max_sequence_length=2048, attention_implementation="sdpa")
    reference = build_generator(len(vocabulary), config, vocabulary.pad_id, device="cuda").eval()
    ours_config = GeneratorConfig(**{**config.__dict__, "attention_implementation": "mkfast"})
    ours = build_generator(len(vocabulary), ours_config,
                           vocabulary.pad_id, device="cuda").eval()
    ours.load_state_dict(reference.state_dict())
    prompt = caption_prompt(vocabulary, CAPTIONS[2], samples=4).cuda()
    tokens = generate(reference, prompt, 40, SamplingOptions(temperature=1.0), seed=0)
    streams = [DecodingStream(model, prompt) for model in (reference, ours)]
    for step in range(tokens.shape[1]):
        torch.testing.assert_close(streams[1].logits, streams[0].logits, atol=2e-2, rtol=2e-2)
        for stream in streams:
            stream.append(tokens[:, step])


@pytest.mark.cuda
def test_bf16_sampling_of_a_32x32_grid_on_cuda(vocabulary):
    """RA-CM3's grid: exactly 1024 codes and '>' per sample, bf16 weights, 10 samples, with guidance."""
    big_vocabulary = CM3Vocabulary(vocabulary.text_tokenizer, 8192)
    model = build_generator(len(big_vocabulary), GeneratorConfig(max_sequence_length=2048),
                            big_vocabulary.pad_id, device="cuda").to(torch.bfloat16).eval()
    prompt = caption_prompt(big_vocabulary, CAPTIONS[1], samples=10).cuda()
    unconditional = caption_prompt(big_vocabulary, "", samples=10).cuda()
    tokens = generate(model, prompt, 1025, SamplingOptions(temperature=1.0, top_k=100), seed=0,
                      constraint=ImageCodeConstraint(big_vocabulary, 1024),
                      unconditional_prompt_ids=unconditional, guidance_scale=3.0)
    assert bool((tokens[:, :1024] >= big_vocabulary.image_offset).all())
    assert bool((tokens[:, 1024] == big_vocabulary.special_ids[IMAGE_CLOSE]).all())
    again = generate(model, prompt, 1025, SamplingOptions(temperature=1.0, top_k=100), seed=0,
                     constraint=ImageCodeConstraint(big_vocabulary, 1024),
                     unconditional_prompt_ids=unconditional, guidance_scale=3.0)
    assert torch.equal(tokens, again)
