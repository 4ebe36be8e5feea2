"""Instructions and multiple-choice questions from the digits set for `mkfast train mks2-*` and the
shipped multiple-choice set; the tokenizer helpers serve the MKS2 demo too, whose data design
(a colour no text states) is mkfast.data.colour_digits.

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
        prompt = INSTRUCTION_TEMPLATE.format(prompt=more_ink_prompt(first, second))
        pairs.append((prompt, DIGIT_NAMES[winner]))
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
        answer = 0 if ink[first] > ink[second] else 1
        items.append({"question": question, "choices": choices, "answer": answer})
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

    word_ids = {word: index for index, word in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(word_ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")



def digits_instruction_set(split: ImageCaptionSplit, ink: list[float], image_instruction_count: int,
                           seed: int = 0) -> tuple[list[str], list[str], list[int | None]]:
    """(prompts, responses, image_indices): every text-only instruction, then ``image_instruction_count``
    image instructions on random images of ``split`` (image_indices index split.images)."""
    rng = random.Random(seed)
    prompts, responses, image_indices = [], [], []
    for prompt, response in text_instructions(ink):
        prompts.append(prompt)
        responses.append(response)
        image_indices.append(None)
    for _ in range(image_instruction_count):
        index = rng.randrange(len(split))
        prompt, response = image_instructions(int(split.labels[index]), ink, rng)
        prompts.append(prompt)
        responses.append(response)
        image_indices.append(index)
    return prompts, responses, image_indices


def multiple_choice_set(ink: list[float]) -> list[dict]:
    """The shipped set (mkfast/data/mks2_digits_multiple_choice.jsonl, 165 items): every ordered ink pair
    (90, the held-out digits included), then sums (a <= b) and differences of digit names, four choices
    each."""
    items = []
    for first, second in itertools.permutations(range(10), 2):
        items.append({"question": INSTRUCTION_TEMPLATE.format(prompt=more_ink_prompt(first, second)),
                      "choices": [DIGIT_NAMES[first], DIGIT_NAMES[second]],
                      "answer": 0 if ink[first] > ink[second] else 1})
    rng = random.Random(0)
    for first, second in itertools.product(range(10), repeat=2):
        for word, value in (("plus", first + second), ("minus", first - second)):
            repeated = (word == "minus" and second == 0) or (word == "plus" and first > second)
            if not 0 <= value <= 9 or repeated:
                continue
            wrong = rng.sample([digit for digit in range(10) if digit != value], 3)
            choices = [value] + wrong
            rng.shuffle(choices)
            items.append({"question": INSTRUCTION_TEMPLATE.format(
                prompt=f"what is {DIGIT_NAMES[first]} {word} {DIGIT_NAMES[second]} ?"),
                "choices": [DIGIT_NAMES[choice] for choice in choices], "answer": choices.index(value)})
    return items
