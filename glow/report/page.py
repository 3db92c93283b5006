"""One page of results: `runs/<name>/figures/index.html`, self-contained.

The page holds the headline bits/dim, the OOD table, the typicality test's decisions,
every figure and the samples (PNG embedded as data URIs), FID values when there are any,
the checkpoint and the run's config. It needs no server and no network, so a figures
folder copied off a cluster opens with a double click (the page alone is enough: nothing
is linked).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from glow.files import atomic_write_text, read_bytes
from glow.report.scores import (
    METRIC_COLUMNS,
    TYPICALITY_HEADER,
    metric_cell,
    scored_data,
    typicality_rows,
    typicality_rule_text,
)
from glow.report.tables import Interval, Spread, cell

__all__ = ["write_index"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""



def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(value) -> str:
    """A number (an interval, a spread) as `glow.report.tables` writes it; text escaped."""
    if isinstance(value, (float, Interval, Spread)):
        return f"<td>{_esc(cell(value))}</td>"
    return f"<td>{_esc(value)}</td>"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + f'<td class="text">{_esc(row[0])}</td>' + "".join(_cell(v) for v in row[1:]) + "</tr>")
    out.append("</table>")
    return out


MAX_IMAGE_BYTES = 64 << 20  # a figure or sample grid is a few hundred KB


def _image(path: Path) -> list[str]:
    data = base64.b64encode(read_bytes(path, MAX_IMAGE_BYTES)).decode("ascii")  # never through a link
    return [f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(path.name)}">',
            f"<figcaption>{_esc(path.name)}</figcaption></figure>"]


def _typicality_section(test: dict | None) -> list[str]:
    """The typicality test as a decision rule (glow.report.scores.ood_table's ``typicality_test``)."""
    if not test or not any(test["ood"].values()):
        return []
    return ["<h2>Typicality test (Nalisnick et al. 2019)</h2>",
            f'<p class="note">{_esc(typicality_rule_text(test))}</p>',
            *_table(TYPICALITY_HEADER, typicality_rows(test))]


def write_index(out: Path, table: dict, images: list[Path], *, run_name: str, config_text: str | None = None,
                fid: dict | None = None) -> Path:
    """Write ``out/index.html`` from the OOD ``table`` (glow.report.scores.ood_table), the PNG ``images``
    (embedded in order), FID entries (``fid.json``) and the run's config.yaml text."""
    title = f"glow-ood results: {run_name}, step {table['step']}"
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p>Checkpoint <code>{_esc(table['checkpoint'])}</code> (step {_esc(table['step'])}, model hash "
            f"<code>{_esc(table['model_hash'])}</code>, {_esc(scored_data(table))}); in-distribution "
            f"<code>{_esc(table['in_distribution'])}</code>.</p>",
            "<h2>Bits per dimension</h2>"]
    body += _table(["split", "bits/dim mean", "std", "count"],
                   [[s, v["mean"], v["std"], v["count"]] for s, v in table["bpd"].items()])
    if fid:
        body.append("<h2>FID</h2>")
        body += _table(["split @ temperature", "FID", "samples"],
                       [[k, float(v["fid"]), v.get("n_samples", "")] for k, v in sorted(fid.items())])
    body.append("<h2>OOD detection</h2>")
    rows = [[f"{spec}: {name}", *(metric_cell(r, k) for k, _ in METRIC_COLUMNS)]
            for spec, scores in table["ood"].items() for name, r in scores.items()]
    body += _table(["OOD set: score", *(h for _, h in METRIC_COLUMNS)], rows)
    body += [f'<p class="note">{_esc(n)}</p>' for n in table.get("notes", [])]
    body += _typicality_section(table.get("typicality_test"))
    body.append("<h2>Figures</h2>")
    for path in images:
        body += _image(path)
    if config_text is not None:
        body += ["<h2>Run config</h2>", f"<pre>{_esc(config_text)}</pre>"]
    page = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_esc(title)}</title>",
            f"<style>{STYLE}</style>", "</head>", "<body>", *body, "</body>", "</html>", ""]
    path = Path(out) / "index.html"
    atomic_write_text(path, "\n".join(page))
    return path
