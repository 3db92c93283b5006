"""The one formatter of tables: Markdown for the report files, aligned text for the terminal.

A table is a header and rows of cells; a float cell is shown with four decimals (``digits``),
an `Interval` as ``value [low, high]``, a `Spread` (several seeds) as ``mean ± sd (N=n)``,
None as ``-``, anything else as text. Columns whose cells are all numbers (intervals and
spreads included) are right-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "Spread", "cell", "markdown_table", "text_table"]


@dataclass(frozen=True)
class Interval:
    """A point value with its confidence interval (e.g. a bootstrap interval of an AUROC)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Spread:
    """A metric over the runs of several seeds: mean, sample standard deviation (None for one run) and N."""

    mean: float
    std: float | None
    n: int


def cell(value, digits: int = 4) -> str:
    """A cell as text: floats with ``digits`` decimals, intervals and spreads likewise, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, Interval):
        return f"{value.value:.{digits}f} [{value.low:.{digits}f}, {value.high:.{digits}f}]"
    if isinstance(value, Spread):
        spread = "" if value.std is None else f" ± {value.std:.{digits}f}"
        return f"{value.mean:.{digits}f}{spread} (N={value.n})"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _numeric(column: Sequence) -> bool:
    numbers = (int, float, Interval, Spread)
    return all(isinstance(v, numbers) or v is None for v in column) and any(v is not None for v in column)


def _columns(header: Sequence[str], rows: Sequence[Sequence]) -> list[list]:
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {row!r}")
    return [[row[i] for row in rows] for i in range(len(header))]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 4) -> list[str]:
    """The table as Markdown lines (pipe table; numeric columns right-aligned)."""
    columns = _columns(header, rows)
    rule = ["---:" if _numeric(col) else "---" for col in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
    return lines


def text_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 4) -> str:
    """The table as aligned plain text for a terminal or a log (two spaces between columns)."""
    columns = _columns(header, rows)
    texts = [[str(h)] + [cell(v, digits) for v in col] for h, col in zip(header, columns)]
    widths = [max(len(t) for t in col) for col in texts]
    right = [_numeric(col) for col in columns]
    lines = []
    for i in range(len(rows) + 1):
        parts = [t[i].rjust(w) if r else t[i].ljust(w) for t, w, r in zip(texts, widths, right)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
