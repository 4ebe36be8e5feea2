"""Image-caption pairs from a folder + captions JSONL and from webdataset tar shards."""

import io
import json
import tarfile

import pytest
import torch

from mkfast.data.pairs import load_image_folder, load_webdataset_shards


def _image(colour, size=(12, 8)):
    # Pillow is optional: without it these tests skip instead of aborting the whole collection.
    image = pytest.importorskip("PIL.Image")
    return image.new("RGB", size, colour)


def test_folder_with_captions_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    _image((255, 0, 0)).save(tmp_path / "images" / "red.png")
    _image((0, 0, 255), (8, 8)).save(tmp_path / "blue.png")
    lines = [{"image": "images/red.png", "caption": "a red square"}, {"image": "blue.png", "caption": "blue"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    pairs = load_image_folder(str(tmp_path), image_size=4)
    assert pairs.images.shape == (2, 3, 4, 4) and pairs.captions == ["a red square", "blue"]
    assert torch.allclose(pairs.images[0, 0], torch.ones(4, 4), atol=1e-3)
    assert torch.allclose(pairs.images[0, 2], torch.zeros(4, 4), atol=1e-3)
    assert torch.allclose(pairs.images[1, 2], torch.ones(4, 4), atol=1e-3)
    assert len(load_image_folder(str(tmp_path), image_size=4, limit=1)) == 1


def test_folder_line_without_caption_is_refused(tmp_path):
    _image((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        load_image_folder(str(tmp_path))


def _add(archive, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
    for shard, colours in enumerate([[(0, 255, 0), (255, 255, 255)], [(0, 0, 0)]]):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as archive:
            for index, colour in enumerate(colours):
                key = f"{shard:05d}{index:04d}"
                buffer = io.BytesIO()
                _image(colour).save(buffer, format="JPEG")
                _add(archive, f"{key}.jpg", buffer.getvalue())
                if index == 0:
                    _add(archive, f"{key}.txt", f"caption {shard} {index}".encode())
                _add(archive, f"{key}.json",
                     json.dumps({"caption": f"json caption {shard} {index}"}).encode())
            # A failed download: json only, no image.
            _add(archive, f"{shard:05d}9999.json",
                 json.dumps({"caption": "missing", "status": "failed"}).encode())
    pairs = load_webdataset_shards(str(tmp_path / "*.tar"), image_size=6)
    assert pairs.captions == ["caption 0 0", "json caption 0 1", "caption 1 0"]
    assert pairs.images.shape == (3, 3, 6, 6)
    assert pairs.images[0, 1].mean() > 0.9 and pairs.images[0, 0].mean() < 0.1
    limited = load_webdataset_shards(str(tmp_path / "*.tar"), image_size=6, limit=2)
    assert limited.captions == pairs.captions[:2]
    with pytest.raises(ValueError, match="no image-caption pairs"):
        load_webdataset_shards(str(tmp_path / "*.none"))
