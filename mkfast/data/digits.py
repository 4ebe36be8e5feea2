"""The embedded demo set: scikit-learn's bundled handwritten digits as image-caption pairs.

No download: the 1,797 8x8 grey digits ship inside scikit-learn. Images are
upscaled (bilinear) to ``image_size`` and repeated over 3 channels so vision
models built for RGB take them as they are; each caption names the digit
("a handwritten digit seven"). The held-out split is fixed by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATE = "a handwritten digit {name}"


@dataclass
class ImageCaptionSplit:
    """images: (N, 3, H, W) float in [0, 1]; labels: (N,) int64; captions: N strings."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], self.captions[index]


def digit_caption(label: int) -> str:
    return CAPTION_TEMPLATE.format(name=DIGIT_NAMES[label])


def load_digits_pairs(image_size: int = 32, held_out_fraction: float = 0.2,
                      seed: int = 0) -> tuple[ImageCaptionSplit, ImageCaptionSplit]:
    """(train, held_out) image-caption pairs from sklearn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 in the bundled set.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held_out_count = int(round(held_out_fraction * len(labels)))
    splits = []
    for indices in (order[held_out_count:], order[:held_out_count]):
        split_labels = labels[indices]
        splits.append(ImageCaptionSplit(images[indices], split_labels,
                                        [digit_caption(int(label)) for label in split_labels]))
    return splits[0], splits[1]


def select_classes(split: ImageCaptionSplit, classes: tuple[int, ...] | list[int]) -> ImageCaptionSplit:
    """The pairs of ``split`` whose digit is one of ``classes``, in their original order."""
    unknown = sorted(set(classes) - set(range(len(DIGIT_NAMES))))
    if unknown:
        raise ValueError(f"select_classes: classes must be digits 0..9, got {unknown}")
    keep = torch.isin(split.labels, torch.tensor(list(classes), dtype=torch.int64)).nonzero().flatten()
    return ImageCaptionSplit(split.images[keep], split.labels[keep],
                             [split.captions[int(row)] for row in keep])


def caption_digit(text: str) -> int | None:
    """The digit a caption names (its last digit name), None when it names none."""
    words = text.lower().replace(".", " ").split()
    named = [DIGIT_NAMES.index(word) for word in words if word in DIGIT_NAMES]
    return named[-1] if named else None
