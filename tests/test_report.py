"""The demo's report page: headline first, every figure present, and it renders in a real browser."""

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from mkfast.report import write_report

RESULTS = {
    "device": "cpu",
    "quick": True,
    "claims": [
        {"paper": "RA-CM3", "claim": "retrieval improves captioning on memory-only classes",
         "arms": "K=2 vs no retrieval", "measured": 0.21, "interval": "[0.12, 0.30]",
         "verdict": "reproduced in direction"},
        {"paper": "MKS2", "claim": "stored visual knowledge helps text-only answers",
         "arms": "MKS2 vs INST-LoRA", "measured": 0.01, "interval": "[-0.05, 0.07]",
         "verdict": "inconclusive"},
    ],
    "racm3": {"seconds": 12.5},
    "mks2": {"seconds": 30.0},
    "seconds": 50.0,
}
SUMMARY = [("RA-CM3 held-out image-token loss, no retrieval", "1.77")]


def _png(path, width=4, height=3):
    """A tiny valid RGB PNG, written without an imaging library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x20\x20" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.fixture
def demo_dir(tmp_path):
    for name in ("racm3/loss_comparison.png", "racm3_inference/text_to_image_grid.png", "mks2/loss.png",
                 "benchmarks/cpu/topk_dedup.png"):
        _png(str(tmp_path / name))
    (tmp_path / "environment.txt").write_text("torch 2.14.1\n")
    return tmp_path


def test_report_puts_the_claims_first_then_every_figure_and_the_environment_last(demo_dir):
    page = Path(write_report(str(demo_dir), RESULTS, SUMMARY)).read_text()
    headline = page.index("id='headline'")
    assert headline < page.index("retrieval improves captioning") < page.index("<h2>RA-CM3: inference")
    assert page.index("reproduced in direction") < page.index("Environment and timings")
    assert "verdict-inconclusive" in page and "1.77" in page
    for figure in ("racm3/loss_comparison.png", "racm3_inference/text_to_image_grid.png", "mks2/loss.png",
                   "benchmarks/cpu/topk_dedup.png"):
        assert f"src='{figure}'" in page, figure
    assert "href='results.json'" in page and '"claims"' not in page  # linked, not inlined
    assert page.index("torch 2.14.1") > page.index("Environment and timings")


def test_stages_name_their_figures_and_tables_in_their_own_order(demo_dir):
    grid = {"path": "racm3_inference/text_to_image_grid.png", "caption": "prompts and samples"}
    k_shot = {"title": "k-shot accuracy", "columns": ["k", "accuracy"], "rows": [[1, 0.61], [8, 0.83]]}
    stage = {"seconds": 1.0, "figures": [grid], "tables": [k_shot]}
    page = Path(write_report(str(demo_dir), {**RESULTS, "racm3_inference": stage}, SUMMARY)).read_text()
    section = page[page.index("<h2>RA-CM3: inference"):page.index("<h2>MKS2")]
    assert section.index("prompts and samples") < section.index("k-shot accuracy") < section.index("0.83")
    assert section.count("text_to_image_grid.png'") == 2  # the link and the image, shown once


def test_report_names_failed_stages(demo_dir):
    failed = {**RESULTS, "mks2": {"error": "ValueError: boom"}}
    page = Path(write_report(str(demo_dir), failed, SUMMARY)).read_text()
    assert "Failed stages: mks2" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (make test-browser installs Debian's)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(demo_dir):
    index = write_report(str(demo_dir), RESULTS, SUMMARY)
    os.remove(demo_dir / "mks2" / "loss.png")  # a figure gone after writing: marked, not a broken page
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               "--virtual-time-budget=5000"]
    dom = subprocess.run(browser + ["--dump-dom", f"file://{index}"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "retrieval improves captioning" in dom and "<table>" in dom
    images = re.findall(r"<img [^>]*>", dom)
    assert len(images) == 4
    missing = [image for image in images if 'class="missing"' in image]
    assert len(missing) == 1 and "mks2/loss.png" in missing[0]
    screenshot = demo_dir / "index.png"
    subprocess.run(browser + [f"--screenshot={screenshot}", "--window-size=1280,1600", f"file://{index}"],
                   capture_output=True, timeout=120, check=True)
    assert screenshot.stat().st_size > 10_000  # a rendered page, not an empty canvas
