"""Plain-text tables for terminals: `flannelette status` and the demo share one layout."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart, a dashed rule under the header; one string
    per line, trailing blanks stripped (so tests and diffs see no invisible spaces)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*row).rstrip() for row in rows)]
