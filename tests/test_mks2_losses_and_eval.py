"""MKS2 losses, multiple-choice scoring and the multiple-choice file loaders."""

import json
import math

import pytest
import torch

from mkfast.data.multiple_choice import (
    load_commonsense_qa,
    load_multiple_choice_jsonl,
    load_openbookqa,
    load_piqa,
    write_multiple_choice_jsonl,
)
from mkfast.mks2.evaluation import score_item
from mkfast.mks2.losses import (
    IGNORE_INDEX,
    next_token_cross_entropy,
    sequence_log_likelihoods,
    text_to_image_infonce,
)


def test_infonce_equals_a_hand_computed_value_on_a_two_pair_batch():
    # Text 0 is parallel to image 0 and orthogonal to image 1; text 1 is at 60 degrees to image 0,
    # parallel to 1.
    text = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2]])
    images = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    temperature = 0.5
    loss = text_to_image_infonce(text, images, torch.tensor(math.log(1 / temperature)))
    # cos: row 0 = [1, 0.5], row 1 = [0.5, 1]; logits = cos / 0.5 = [[2, 1], [1, 2]].
    expected = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) * 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_infonce_temperature_is_learnable_and_capped():
    text, images = torch.randn(5, 3), torch.randn(5, 3)
    logit_scale = torch.tensor(1.0, requires_grad=True)
    text_to_image_infonce(text, images, logit_scale).backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0
    capped = text_to_image_infonce(text, images, torch.tensor(50.0))
    at_cap = text_to_image_infonce(text, images, torch.tensor(math.log(100)))
    assert capped.item() == pytest.approx(at_cap.item())


def test_infonce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        text_to_image_infonce(torch.randn(4, 3), torch.randn(4, 5), torch.tensor(1.0))


def test_cross_entropy_and_log_likelihood_skip_ignored_positions():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]])
    log_probabilities = torch.log_softmax(logits, dim=-1)
    picked = [log_probabilities[0, 0, 3], log_probabilities[0, 2, 5], log_probabilities[1, 1, 1]]
    assert next_token_cross_entropy(logits, labels).item() == pytest.approx(-sum(picked).item() / 3, rel=1e-6)
    sums = sequence_log_likelihoods(logits, labels)
    assert sums[0].item() == pytest.approx((picked[0] + picked[1]).item(), rel=1e-6)
    assert sums[1].item() == pytest.approx(picked[2].item(), rel=1e-6)


def test_acc_norm_divides_by_choice_length_in_characters():
    # Raw log-likelihood prefers the short choice; per character the long one wins.
    log_likelihoods = torch.tensor([-2.0, -3.0])
    scores = score_item(log_likelihoods, ["ab", "abcdefghij"], answer=1)
    assert scores == {"acc": 0.0, "acc_norm": 1.0}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_jsonl_round_trip_and_validation(tmp_path):
    items = [{"question": "q?", "choices": ["a", "b", "c"], "answer": 2}]
    write_multiple_choice_jsonl(items, str(tmp_path / "set.jsonl"))
    assert load_multiple_choice_jsonl(str(tmp_path / "set.jsonl")) == items
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(ValueError, match="answer must be an index"):
        load_multiple_choice_jsonl(bad)


def test_local_piqa_csqa_obqa_files_load_in_both_layouts(tmp_path):
    piqa = _write_jsonl(tmp_path / "valid.jsonl", [{"goal": "open a jar", "sol1": "twist", "sol2": "lick"}])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    assert load_piqa(piqa)[0] == {"question": "Question: open a jar\nAnswer:", "choices": ["twist", "lick"],
                                  "answer": 0}
    csqa = _write_jsonl(tmp_path / "csqa.jsonl", [
        {"answerKey": "B", "question": {"stem": "Where?", "choices": [{"label": "A", "text": "x"},
                                                                      {"label": "B", "text": "y"}]}},
        {"answerKey": "A", "question": "Who?", "choices": {"label": ["A", "B"], "text": ["p", "q"]}}])
    assert [item["answer"] for item in load_commonsense_qa(csqa)] == [1, 0]
    obqa = _write_jsonl(tmp_path / "obqa.jsonl", [
        {"answerKey": "C", "question_stem": "Sun is",
         "choices": {"label": ["A", "B", "C"], "text": ["a", "b", "hot"]}}])
    assert load_openbookqa(obqa)[0]["choices"][2] == "hot" and load_openbookqa(obqa)[0]["answer"] == 2
