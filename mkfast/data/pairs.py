"""Image-text pairs from disk: a folder with a captions JSONL, or webdataset tar shards (img2dataset's
format).

Folder layout: ``<folder>/captions.jsonl`` with one ``{"image": "relative/path.png",
"caption": "..."}`` per line. Webdataset shards: tar files where the members of
one sample share a key (``000000012.jpg``, ``000000012.txt``, ``000000012.json``),
which is what img2dataset writes for LAION. Both load as
:class:`mkfast.data.digits.ImageCaptionSplit` (images (N, 3, S, S) in [0, 1],
centre-cropped and resized to ``image_size``; labels all -1: no classes).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import torch
import torch.nn.functional as F

from mkfast.data.digits import ImageCaptionSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def image_to_tensor(image, image_size: int) -> torch.Tensor:
    """A PIL image -> (3, image_size, image_size) float in [0, 1], centre square crop then bilinear resize."""
    import numpy

    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.uint8).copy()).permute(2, 0, 1).float() / 255.0
    resized = F.interpolate(pixels.unsqueeze(0), size=(image_size, image_size), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized[0].clamp(0.0, 1.0)


def _split(images: list[torch.Tensor], captions: list[str], source: str) -> ImageCaptionSplit:
    if not images:
        raise ValueError(f"no image-caption pairs found in {source}")
    return ImageCaptionSplit(torch.stack(images), torch.full((len(images),), -1, dtype=torch.int64), captions)


def load_image_folder(folder: str, image_size: int = 256, captions_file: str = CAPTIONS_FILE,
                      limit: int | None = None) -> ImageCaptionSplit:
    """Pairs listed in ``<folder>/<captions_file>`` (JSONL: image path relative to the folder, caption)."""
    from PIL import Image

    images, captions = [], []
    with open(os.path.join(folder, captions_file)) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "image" not in record or "caption" not in record:
                raise ValueError(f"{captions_file} line {line_number}: needs 'image' and 'caption', "
                                 f"got {sorted(record)}")
            with Image.open(os.path.join(folder, record["image"])) as image:
                images.append(image_to_tensor(image, image_size))
            captions.append(record["caption"])
            if limit and len(captions) == limit:
                break
    return _split(images, captions, folder)


def load_webdataset_shards(pattern: str, image_size: int = 256,
                           limit: int | None = None) -> ImageCaptionSplit:
    """Pairs from tar shards matching ``pattern`` (a glob), samples keyed by member name without extension.

    The caption is the ``.txt`` member, or the ``caption`` field of the ``.json`` member.
    Samples without an image or a caption are skipped (img2dataset keeps failed downloads' json).
    """
    from PIL import Image

    images, captions = [], []
    for path in sorted(glob.glob(pattern)):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                if not member.isfile():
                    continue
                key, extension = os.path.splitext(member.name)
                samples.setdefault(key, {})[extension.lower()] = archive.extractfile(member).read()
        for key in sorted(samples):
            sample = samples[key]
            image_bytes = next((sample[extension] for extension in IMAGE_EXTENSIONS if extension in sample),
                               None)
            caption = sample[".txt"].decode("utf-8").strip() if ".txt" in sample else None
            if caption is None and ".json" in sample:
                caption = json.loads(sample[".json"]).get("caption")
            if image_bytes is None or not caption:
                continue
            with Image.open(io.BytesIO(image_bytes)) as image:
                images.append(image_to_tensor(image, image_size))
            captions.append(caption)
            if limit and len(captions) == limit:
                return _split(images, captions, pattern)
    return _split(images, captions, pattern)
