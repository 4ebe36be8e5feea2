"""Multiple-choice sets as {question, choices, answer} items: a JSONL reader and local PIQA/CSQA/OBQA loaders.

Nothing is downloaded: the loaders read files a user already has, in the layout of
the original releases or of their Hugging Face `datasets` JSON exports.
"""

from __future__ import annotations

import json
import os


def _validate(item: dict, where: str) -> dict:
    for key in ("question", "choices", "answer"):
        if key not in item:
            raise ValueError(f"{where}: item has no {key!r}: {item}")
    choices, answer = item["choices"], item["answer"]
    all_strings = isinstance(choices, list) and all(isinstance(choice, str) for choice in choices)
    if not all_strings or len(choices) < 2:
        raise ValueError(f"{where}: choices must be a list of at least two strings, got {choices!r}")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer must be an index into choices (0..{len(choices) - 1}), "
                         f"got {answer!r}")
    return {"question": item["question"], "choices": choices, "answer": answer}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_multiple_choice_jsonl(path: str) -> list[dict]:
    """A JSONL file of {"question": str, "choices": [str, ...], "answer": int}."""
    return [_validate(item, f"{path}:{number + 1}") for number, item in enumerate(read_jsonl(path))]


def write_multiple_choice_jsonl(items: list[dict], path: str) -> None:
    with open(path, "w") as handle:
        for item in items:
            handle.write(json.dumps(_validate(item, path)) + "\n")


def _letter_choices(choices) -> tuple[list[str], list[str]]:
    """CSQA/OBQA choices as [{"label", "text"}] (original) or {"label": [...], "text": [...]} (datasets)."""
    if isinstance(choices, dict):
        return list(choices["label"]), list(choices["text"])
    return [choice["label"] for choice in choices], [choice["text"] for choice in choices]


def load_piqa(path: str, labels_path: str | None = None) -> list[dict]:
    """PIQA: {"goal", "sol1", "sol2"} per line, labels in the record ("label") or in a .lst file beside it."""
    records = read_jsonl(path)
    if labels_path is None and records and "label" not in records[0]:
        guess = os.path.splitext(path)[0] + "-labels.lst"
        if not os.path.exists(guess):
            raise ValueError(f"load_piqa: {path} has no labels; pass labels_path (e.g. valid-labels.lst)")
        labels_path = guess
    labels = None
    if labels_path is not None:
        with open(labels_path) as handle:
            labels = [int(line) for line in handle if line.strip()]
        if len(labels) != len(records):
            raise ValueError(f"load_piqa: {len(labels)} labels for {len(records)} records")
    return [_validate({"question": f"Question: {record['goal']}\nAnswer:",
                       "choices": [record["sol1"], record["sol2"]],
                       "answer": int(labels[index] if labels is not None else record["label"])}, path)
            for index, record in enumerate(records)]


def load_commonsense_qa(path: str) -> list[dict]:
    """CommonsenseQA JSONL: the original {"question": {"stem", "choices"}, "answerKey"} or datasets'
    flat layout."""
    items = []
    for record in read_jsonl(path):
        question = record["question"]
        stem, choices = (question["stem"], question["choices"]) if isinstance(question, dict) else \
            (question, record["choices"])
        labels, texts = _letter_choices(choices)
        items.append(_validate({"question": f"Question: {stem}\nAnswer:", "choices": texts,
                                "answer": labels.index(record["answerKey"])}, path))
    return items


def load_openbookqa(path: str) -> list[dict]:
    """OpenBookQA JSONL: the original {"question": {"stem", "choices"}} or datasets'
    {"question_stem", "choices"}."""
    items = []
    for record in read_jsonl(path):
        if "question_stem" in record:
            stem, choices = record["question_stem"], record["choices"]
        else:
            stem, choices = record["question"]["stem"], record["question"]["choices"]
        labels, texts = _letter_choices(choices)
        answer = labels.index(record["answerKey"])
        items.append(_validate({"question": stem, "choices": texts, "answer": answer}, path))
    return items


LOADERS = {"jsonl": load_multiple_choice_jsonl, "piqa": load_piqa, "csqa": load_commonsense_qa,
           "obqa": load_openbookqa}
