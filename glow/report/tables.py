"""The one formatter of tables: Markdown for the report files, aligned text for the terminal.

A table is a header and rows of cells; a float cell is shown with four decimals (``digits``),
None as ``-``, anything else as text. Columns whose cells are all numbers are right-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cell", "markdown_table", "text_table"]


def cell(value, digits: int = 4) -> str:
    """A cell as text: floats with ``digits`` decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _numeric(column: Sequence) -> bool:
    return all(isinstance(v, (int, float)) or v is None for v in column) and any(v is not None for v in column)


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
