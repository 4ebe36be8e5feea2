"""MKS2's mechanism check: entities whose colour only their (synthetic) image features show."""

import pytest
import torch

from mkfast.claims import NOT_REPRODUCED, REPRODUCED
from mkfast.mks2 import entity_memory
from mkfast.mks2.build import build_mks2, small_llama
from mkfast.mks2.entity_memory import (
    CAPTION,
    COLOURS,
    EntitySizes,
    claims,
    image_features,
    make_world,
    question_items,
    tokenizer_for,
)
from mkfast.mks2.samples import instruction_sample
from mkfast.mks2.small_runs import model_config

SMALL = EntitySizes(asked=12, held_out=8, pretrain_steps=1, stage1_steps=1, stage2_steps=1, seeds=(0,))


def test_a_world_has_distinct_one_token_names_and_balanced_colours():
    world = make_world(SMALL, seed=0)
    assert len(set(world.names)) == len(world.names) == 20
    assert int(world.colours.sum()) == 10  # half blue
    tokenizer = tokenizer_for(world)
    for name in world.names:
        assert tokenizer.convert_tokens_to_ids(name) != tokenizer.unk_token_id
    assert make_world(SMALL, seed=0).names == world.names and make_world(SMALL, seed=1).names != world.names
    with pytest.raises(ValueError, match="distinct names"):
        make_world(EntitySizes(asked=2000, held_out=0, pretrain_steps=1, stage1_steps=1, stage2_steps=1), 0)


def test_no_text_states_a_colour_and_the_question_ends_where_stage1_reads():
    world = make_world(SMALL, seed=0)
    tokenizer = tokenizer_for(world)
    item = question_items(world, [0])[0]
    assert item["question"].startswith(CAPTION.format(name=world.names[0]))
    assert item["choices"] == list(COLOURS)
    sample = instruction_sample(tokenizer, item["question"], "red")
    answer_at = sample.loss_mask.index(True)
    assert sample.token_ids[answer_at - 1] == tokenizer.eos_token_id  # the answer follows </s>
    assert not any(colour in CAPTION for colour in COLOURS)


def test_neither_colour_is_a_safe_constant_answer_on_the_full_held_out_set():
    for seed in entity_memory.FULL.seeds:
        world = make_world(entity_memory.FULL, seed)
        assert 0.3 < float(world.colours[list(world.held_out)].float().mean()) < 0.7


def test_image_features_share_one_colour_direction():
    world = make_world(SMALL, seed=0)
    tokenizer = tokenizer_for(world)
    model = build_mks2(small_llama(model_config(tokenizer), tokenizer, seed=0), image_size=32, seed=0)
    features = image_features(world, model.vision, 4.0, seed=0)
    assert features.global_features.shape == (20, model.vision.global_feature_size)
    assert features.query_output.shape[:2] == (20, model.vision.num_query_tokens)
    centred = features.global_features - features.global_features.mean(0)
    colour_axis = features.global_features[world.colours == 1].mean(0) - features.global_features[
        world.colours == 0].mean(0)
    projection = centred @ torch.nn.functional.normalize(colour_axis, dim=0)
    assert torch.equal(projection > 0, world.colours == 1)


def test_claims_pair_mks2_with_the_baseline_and_no_stage1():
    def run(mks2: float, baseline: float) -> dict:
        return {"results": {"mks2": {"held_out": {"acc": mks2}}, "baseline": {"held_out": {"acc": baseline}},
                            "no_stage1": {"held_out": {"acc": baseline}}}}

    rows = claims([run(0.8, 0.5), run(0.85, 0.45), run(0.9, 0.5)])
    assert [row["verdict"] for row in rows] == [REPRODUCED, REPRODUCED]
    assert claims([run(0.3, 0.5), run(0.35, 0.55), run(0.3, 0.6)])[0]["verdict"] == NOT_REPRODUCED


def test_a_short_run_reports_every_arm(tmp_path):
    result = entity_memory.run(SMALL, 0, str(tmp_path))
    assert set(result["results"]) == set(entity_memory.ARMS)
    for arm in entity_memory.ARMS:
        assert result["results"][arm]["held_out"]["items"] == SMALL.held_out
        assert result["results"][arm]["asked"]["items"] == SMALL.asked
    assert sum(result["constant_answer_accuracy"].values()) == pytest.approx(1.0)
