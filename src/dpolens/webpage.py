"""HTML pieces of the report that every stage's section uses: escaped cells, tables with a
caption, embedded images. No stage knowledge here."""

from __future__ import annotations

import base64
import html
from pathlib import Path


class Markup(str):
    """A cell that is already HTML (built from escaped parts): `fmt` leaves it as it is."""


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x) -> str:
    """One table cell: numbers to 4 significant digits (cosines near 1 to 7 decimals), a
    {mean, ci95} block as `mean [lo, hi]`, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, Markup):
        return str(x)
    if isinstance(x, float):
        return f"{x:.7f}" if 0.999 < abs(x) < 1 else f"{x:.4g}"  # cosines near 1 must not print as 1
    if isinstance(x, dict) and "mean" in x:
        if x["mean"] is None:
            return "–"
        ci = x.get("ci95")
        return f"{x['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    if isinstance(x, list) and x and isinstance(x[0], float):
        return ", ".join(f"{v:.3f}" for v in x)
    return esc(x)


def table(rows: list[dict], cols: list[str], caption: str) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<figure><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" \
           f"<figcaption>{esc(caption)}</figcaption></figure>"


def image(path: Path, caption: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{esc(path.stem)}" src="data:image/png;base64,{data}">' \
           f"<figcaption>{esc(caption)}</figcaption></figure>"
