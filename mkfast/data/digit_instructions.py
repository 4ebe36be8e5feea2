"""Instructions and multiple-choice questions generated from the digits demo set (MKS2 demo).

What the images teach: how much ink each digit takes (its mean pixel value over the
training images), a fact no caption states. Stage-2 text-only instructions ask
"which uses more ink" only about pairs of *training* digits; image instructions ask
it about the digit in an image against a training digit. The held-out multiple-choice
questions are text-only and involve a *held-out* digit, so a text-only model has
never seen an answer about it: only knowledge stored from the images can help.
"""

from __future__ import annotations

import itertools
import random
import re

from mkfast.data.digits import DIGIT_NAMES, ImageCaptionSplit

# Digits whose ink is asked about only in the held-out questions (fixed so runs compare).
HELD_OUT_DIGITS = (2, 5, 7)
INSTRUCTION_TEMPLATE = "[INST] {prompt} [/INST]"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def ink_per_digit(split: ImageCaptionSplit) -> list[float]:
    """Mean pixel value of each digit's training images: the fact only the images hold."""
    return [float(split.images[split.labels == digit].mean()) for digit in range(10)]


def more_ink_prompt(first: int, second: int) -> str:
    return f"which digit uses more ink , {DIGIT_NAMES[first]} or {DIGIT_NAMES[second]} ?"


def text_instructions(ink: list[float]) -> list[tuple[str, str]]:
    """(prompt, response) text-only instructions: ink comparisons between training digits, and sums."""
    train_digits = [digit for digit in range(10) if digit not in HELD_OUT_DIGITS]
    pairs = []
    for first, second in itertools.permutations(train_digits, 2):
        winner = first if ink[first] > ink[second] else second
        pairs.append((INSTRUCTION_TEMPLATE.format(prompt=more_ink_prompt(first, second)), DIGIT_NAMES[winner]))
    for first, second in itertools.product(range(10), repeat=2):
        if first + second <= 9:
            prompt = f"what is {DIGIT_NAMES[first]} plus {DIGIT_NAMES[second]} ?"
            pairs.append((INSTRUCTION_TEMPLATE.format(prompt=prompt), DIGIT_NAMES[first + second]))
    return pairs


def image_instructions(label: int, ink: list[float], rng: random.Random) -> tuple[str, str]:
    """(prompt, response) about an image of ``label``: name it, add to it, or compare its ink."""
    kind = rng.randrange(3)
    if kind == 0:
        return INSTRUCTION_TEMPLATE.format(prompt="which digit is shown ?"), DIGIT_NAMES[label]
    if kind == 1:
        addend = rng.randrange(0, 10 - label)
        prompt = f"what is {DIGIT_NAMES[addend]} plus the digit shown ?"
        return INSTRUCTION_TEMPLATE.format(prompt=prompt), DIGIT_NAMES[addend + label]
    other = rng.choice([digit for digit in range(10) if digit not in HELD_OUT_DIGITS and digit != label])
    prompt = f"which uses more ink , the digit shown or {DIGIT_NAMES[other]} ?"
    winner = "the digit shown" if ink[label] > ink[other] else DIGIT_NAMES[other]
    return INSTRUCTION_TEMPLATE.format(prompt=prompt), winner


def held_out_questions(ink: list[float]) -> list[dict]:
    """Text-only multiple choice {question, choices, answer} on pairs with at least one held-out digit."""
    items = []
    for first, second in itertools.permutations(range(10), 2):
        if first not in HELD_OUT_DIGITS and second not in HELD_OUT_DIGITS:
            continue
        question = INSTRUCTION_TEMPLATE.format(prompt=more_ink_prompt(first, second))
        choices = [DIGIT_NAMES[first], DIGIT_NAMES[second]]
        items.append({"question": question, "choices": choices, "answer": 0 if ink[first] > ink[second] else 1})
    return items


def demo_vocabulary(extra_texts: list[str] = ()) -> list[str]:
    """Every word the demo's captions, instructions and questions use, plus the special tokens."""
    words = set(DIGIT_NAMES)
    fixed = ("a handwritten digit [INST] [/INST] which digit is shown ? what is plus the uses more ink , or "
             "than yes no")
    for text in (fixed, *extra_texts):
        words.update(re.findall(r"\w+|[^\w\s]+", text))
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def word_level_tokenizer(vocabulary: list[str]):
    """A transformers fast tokenizer over whole words (the demo's small Llama has no pretrained one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({word: index for index, word in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")

