"""The MKS2 demo's data: visual knowledge that no text states, so only storage from images can supply it.

Each digit class is drawn in one colour (red or blue), five classes of each. Captions name the
digit and never a colour ("a handwritten digit seven"), so the colour of a class is in the
images only. Stage-2 text instructions ask "what colour is the digit X ?" for the split's eight
training classes only; the held-out questions ask it for the other two, one of each colour, so
that answering any constant colour, or the colour most training classes have, scores exactly 0.5.

Splits come in cycles of five: a cycle pairs the ten classes at random and its five splits
hold out one pair each, so over a cycle every class is asked about once. Each split draws its
own colouring (five classes of each colour, the held-out pair one of each): with one colouring
for a whole cycle, every run would share how that colouring happens to line up with the base
model's similarities between digit names (it learns sums, so "four" resembles "five"), and the
runs would not be independent draws. Eight training classes rather than six give stage 2 and
the linear probe more classes to find a colour direction shared across classes in.

The frozen vision encoder's stand-in pretrains on images coloured at random (colour
independent of the class), as an off-the-shelf encoder knows colours but not this data's
class-to-colour rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mkfast.data.digits import DIGIT_NAMES, ImageCaptionSplit

# Ink RGB per colour: far apart in every channel, so a frozen encoder cannot miss the difference.
COLOURS = {"red": (1.0, 0.15, 0.1), "blue": (0.1, 0.3, 1.0)}
COLOUR_NAMES = tuple(COLOURS)
# One held-out class per colour and split; a cycle of five splits holds out every class once.
HELD_OUT_PER_COLOUR = 1
SPLITS_PER_CYCLE = 5
INSTRUCTION_TEMPLATE = "[INST] {prompt} [/INST]"
# Three phrasings of one question; the choice order inside the prompt alternates.
COLOUR_QUESTIONS = ("what colour is the digit {name} ?", "is the digit {name} red or blue ?",
                    "is the digit {name} blue or red ?")
# Plain text for the base model: the colour words in use, never a digit's colour.
COLOUR_WORD_TEXTS = tuple(f"the colour {colour}" for colour in COLOUR_NAMES)
# Texts whose class-name token the linear probe reads (the caption first: what stage 1 trains on).
PROBE_TEMPLATES = ("a handwritten digit {name}", "the digit {name}", *COLOUR_QUESTIONS)


@dataclass(frozen=True)
class ColourSplit:
    """colour_of[d]: the index in COLOUR_NAMES of digit d's colour; held_out: the classes stage 2 never
    names."""

    index: int
    colour_of: tuple[int, ...]
    held_out: tuple[int, ...]

    @property
    def training_classes(self) -> tuple[int, ...]:
        return tuple(digit for digit in range(len(DIGIT_NAMES)) if digit not in self.held_out)

    def colour_name(self, digit: int) -> str:
        return COLOUR_NAMES[self.colour_of[digit]]


def colour_split(index: int) -> ColourSplit:
    """Split ``index``: the ``index % SPLITS_PER_CYCLE``-th pair of cycle ``index // SPLITS_PER_CYCLE``'s
    random pairing of the classes is held out, one class red and one blue; the other eight classes are
    coloured four and four at random (all drawn from ``index``)."""
    cycle, position = divmod(index, SPLITS_PER_CYCLE)
    digits = list(range(len(DIGIT_NAMES)))
    random.Random(f"colour-cycle-{cycle}").shuffle(digits)
    per_split = HELD_OUT_PER_COLOUR * len(COLOUR_NAMES)
    held_out = digits[position * per_split:(position + 1) * per_split]
    rng = random.Random(f"colour-split-{index}")
    others = [digit for digit in range(len(DIGIT_NAMES)) if digit not in held_out]
    rng.shuffle(held_out)
    rng.shuffle(others)
    colour_of = [0] * len(DIGIT_NAMES)
    per_colour = len(others) // len(COLOUR_NAMES)
    for colour in range(len(COLOUR_NAMES)):
        members = (held_out[colour * HELD_OUT_PER_COLOUR:(colour + 1) * HELD_OUT_PER_COLOUR]
                   + others[colour * per_colour:(colour + 1) * per_colour])
        for digit in members:
            colour_of[digit] = colour
    return ColourSplit(index, tuple(colour_of), tuple(sorted(held_out)))


def colourise(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Grey (N, 3, H, W) digits in [0, 1] -> ink of colour COLOUR_NAMES[colours[i]] on black."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colourise: images must be (N, 3, H, W), got {tuple(images.shape)}")
    if colours.shape != images.shape[:1]:
        raise ValueError(f"colourise: colours must be ({images.shape[0]},), got {tuple(colours.shape)}")
    palette = torch.tensor(list(COLOURS.values()), dtype=images.dtype)
    return images[:, :1] * palette[colours][:, :, None, None]


def coloured_pairs(split: ImageCaptionSplit, colours: ColourSplit) -> ImageCaptionSplit:
    """``split``'s pairs with each image drawn in its class's colour; captions unchanged (no colour word)."""
    per_image = torch.tensor(colours.colour_of)[split.labels]
    return ImageCaptionSplit(colourise(split.images, per_image), split.labels, list(split.captions))


def randomly_coloured(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in a colour drawn per image, independent of the class; those colour indices)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(len(COLOUR_NAMES), (images.shape[0],), generator=generator)
    return colourise(images, colours), colours


def colour_question_items(colours: ColourSplit, digits: tuple[int, ...]) -> list[dict]:
    """Text-only multiple choice {question, choices, answer} on the colour of each of ``digits``."""
    return [{"question": INSTRUCTION_TEMPLATE.format(prompt=template.format(name=DIGIT_NAMES[digit])),
             "choices": list(COLOUR_NAMES), "answer": colours.colour_of[digit]}
            for digit in digits for template in COLOUR_QUESTIONS]


def held_out_questions(colours: ColourSplit) -> list[dict]:
    return colour_question_items(colours, colours.held_out)


def seen_questions(colours: ColourSplit) -> list[dict]:
    return colour_question_items(colours, colours.training_classes)


def sum_instructions() -> list[tuple[str, str]]:
    """(prompt, response) sums of digit names: general instructions every arm gets alike."""
    return [(INSTRUCTION_TEMPLATE.format(prompt=f"what is {DIGIT_NAMES[first]} plus {DIGIT_NAMES[second]} ?"),
             DIGIT_NAMES[first + second]) for first in range(10) for second in range(10 - first)]


def stage2_instructions(colours: ColourSplit) -> tuple[list[str], list[str]]:
    """(prompts, responses): the training classes' colour questions, then sums. Text only, the same for
    every arm of the comparison."""
    pairs = [(item["question"], item["choices"][item["answer"]]) for item in seen_questions(colours)]
    pairs += sum_instructions()
    return [prompt for prompt, _ in pairs], [response for _, response in pairs]


def pretraining_texts(captions: list[str]) -> list[str]:
    """Plain text for the base model: every caption, every sum, the colour words; never a digit's colour."""
    sums = [f"{prompt} {response}" for prompt, response in sum_instructions()]
    return sorted(set(captions)) + sums + list(COLOUR_WORD_TEXTS)


def constant_answer_accuracy(items: list[dict], choice: str) -> float:
    """Accuracy of always answering ``choice`` (a name prior's score: 0.5 on a balanced set)."""
    return sum(item["choices"][item["answer"]] == choice for item in items) / len(items)
