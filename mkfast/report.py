"""The demo's report page: ``index.html`` a person reads, built from ``results.json``.

Order: the headline table (the papers' claims with their verdicts when the results carry
them, then the summary rows `make demo` prints), one section per method with the figures
that carry its result, the kernels, and the environment and timings last. A stage's
results may name its figures (``"figures": [{"path", "caption"}]``, paths relative to the
demo's output folder) and tables (``"tables": [{"title", "columns", "rows"}]``); other
PNGs under the stage's folder are shown after those, captioned by their path. The raw JSON
is linked, not inlined. Images are referenced beside the page (relative paths), so the
page is self-contained with its folder and needs no network.
"""

from __future__ import annotations

import html
import os

from mkfast.claims import CONTROL_FAILS, CONTROL_HOLDS, NOT_REPRODUCED, REPRODUCED

# Sections of the page: (title, the stage folders whose figures it shows, what the figures say).
SECTIONS = [
    ("RA-CM3: retrieval-augmented training", ["racm3"],
     "Training losses of the generator arms, with and without retrieved documents in context."),
    ("RA-CM3: inference", ["racm3_inference"],
     "Images sampled from captions beside their prompts and the documents retrieved for them."),
    ("MKS2: visual memory and the mixture of experts", ["mks2"],
     "Training losses of each stage and arm (first run), then each run's held-out accuracy per arm."),
    ("Kernels on this device", ["benchmarks"],
     "Each suite's speedup over its baseline (a quick pass; the full suites are `make bench`)."),
]

# Human captions for the figures the stages write; anything else is captioned by its path.
CAPTIONS = {
    "loss_comparison.png": "Training loss per arm (same steps, same data order)",
    "entity_losses.png": "Mechanism check: the retrieval generator's loss per seed on entities with "
                         "random-code images; it drops where the generator starts copying the retrieved twin",
    "text_to_image_grid.png": "Text to image: each row a prompt, its retrieved documents, then samples",
    "loss.png": "Loss per stage and arm",
}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 0 auto; padding: 1em 1.5em;
       line-height: 1.45; color: #1d1d1f; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f5; }
td.number { font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict-reproduced { color: #0a6b2d; font-weight: 600; }
.verdict-not { color: #a0211b; font-weight: 600; }
.verdict-inconclusive { color: #8a5a00; font-weight: 600; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #eee; }
img.missing { min-width: 12em; min-height: 3em; border: 1px dashed #a0211b; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #555; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _verdict_class(verdict: str) -> str:
    return {REPRODUCED: "verdict-reproduced", CONTROL_HOLDS: "verdict-reproduced",
            NOT_REPRODUCED: "verdict-not", CONTROL_FAILS: "verdict-not"}.get(verdict, "verdict-inconclusive")


def claims_table(claims: list[dict]) -> str:
    """One row per paper claim: ``{"paper", "claim", "arms", "measured", "interval", "verdict"}``."""
    rows = []
    for claim in claims:
        verdict = str(claim.get("verdict", ""))
        rows.append(
            "<tr>"
            + "".join(f"<td>{html.escape(_cell(claim.get(key, '')))}</td>"
                      for key in ("paper", "claim", "arms"))
            + f"<td class='number'>{html.escape(_cell(claim.get('measured', '')))}</td>"
            + f"<td class='number'>{html.escape(_cell(claim.get('interval', '')))}</td>"
            + f"<td class='{_verdict_class(verdict)}'>{html.escape(verdict)}</td></tr>"
        )
    header = "".join(f"<th>{name}</th>" for name in ("paper", "claim", "arms compared", "measured gain",
                                                      "95% interval", "verdict"))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def summary_rows_table(rows: list[tuple[str, str]]) -> str:
    # Numbers stay on one line; a sentence (a stage's note) wraps like text.
    body = "".join(f"<tr><td>{html.escape(label)}</td>"
                   f"<td{' class=number' if len(value) < 24 else ''}>{html.escape(value)}</td></tr>"
                   for label, value in rows)
    return f"<table><tr><th>what</th><th>measured</th></tr>{body}</table>"


def _figures(output_dir: str, folders: list[str]) -> list[str]:
    """PNG paths (relative to output_dir) under the given stage folders, in a stable order."""
    found = []
    for folder in folders:
        root = os.path.join(output_dir, folder)
        for directory, _, files in sorted(os.walk(root)):
            found.extend(os.path.relpath(os.path.join(directory, name), output_dir)
                         for name in sorted(files) if name.endswith(".png"))
    return found


def data_table(table: dict) -> str:
    """``{"title", "columns": [...], "rows": [[...], ...]}`` as a titled HTML table."""
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in table["columns"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in row) + "</tr>"
                   for row in table["rows"])
    return f"<h3>{html.escape(table['title'])}</h3><table><tr>{header}</tr>{body}</table>"


def _figure(path: str, caption: str | None = None) -> str:
    caption = caption or CAPTIONS.get(os.path.basename(path), path)
    source = html.escape(path)
    # A figure a stage did not write shows as "missing" instead of a broken-image icon.
    return (f"<figure><a href='{source}'><img src='{source}' alt='{html.escape(caption)}' "
            "onerror=\"this.classList.add('missing')\"></a>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _stage_timings(results: dict) -> list[tuple[str, str]]:
    rows = [(name, f"{value['seconds']:.1f} s") for name, value in results.items()
            if isinstance(value, dict) and isinstance(value.get("seconds"), (int, float))]
    if isinstance(results.get("seconds"), (int, float)):
        rows.append(("whole demo", f"{results['seconds']:.1f} s"))
    return rows


def render(output_dir: str, results: dict, summary_rows: list[tuple[str, str]],
           environment: str = "") -> str:
    """The page's HTML for ``results`` (the figures are looked up under ``output_dir``)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>mkfast demo</title><style>{STYLE}</style></head><body>",
             "<h1>mkfast demo</h1>",
             f"<p class='note'>Device: {html.escape(str(results.get('device', '?')))}"
             f"{' (quick run: small settings)' if results.get('quick') else ''}. "
             "Every number below is in <a href='results.json'>results.json</a>.</p>",
             "<h2 id='headline'>Headline</h2>"]
    claims = results.get("claims")
    if claims:
        parts.append(claims_table(claims))
    parts.append(summary_rows_table(summary_rows))
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    if failed:
        parts.append("<p class='verdict-not'>Failed stages: " + html.escape(", ".join(failed)) + "</p>")
    for title, folders, description in SECTIONS:
        figures = _figures(output_dir, folders)
        stages = [results[folder] for folder in folders if isinstance(results.get(folder), dict)]
        if not figures and not stages:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(description)}</p>")
        # A stage names the figures and tables that carry its result (in its own order and words);
        # any other figure it wrote follows, captioned by its path.
        named = [figure for stage in stages for figure in stage.get("figures", [])]
        parts.extend(_figure(figure["path"], figure.get("caption")) for figure in named)
        parts.extend(data_table(table) for stage in stages for table in stage.get("tables", []))
        shown = {figure["path"] for figure in named}
        parts.extend(_figure(path) for path in figures if path not in shown)
    parts.append("<h2>Environment and timings</h2>")
    parts.append(summary_rows_table(_stage_timings(results)))
    if environment:
        parts.append(f"<pre>{html.escape(environment)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_dir: str, results: dict, summary_rows: list[tuple[str, str]]) -> str:
    """Write ``output_dir/index.html``; returns its path."""
    environment_path = os.path.join(output_dir, "environment.txt")
    environment = ""
    if os.path.exists(environment_path):
        with open(environment_path) as handle:
            environment = handle.read()
    page = render(output_dir, results, summary_rows, environment)
    path = os.path.join(output_dir, "index.html")
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(page)
    os.replace(temporary, path)
    return path

