"""The admin view's picture: answers and tokens per day of the last 30 days, per domain (PNG).

matplotlib with the Agg backend through `Figure` objects (no pyplot and its global state),
so it is safe in a worker thread; the import costs about a second and is paid on the first
/stats, in that thread, never at start. Callers run `render` with `asyncio.to_thread`.
"""
from __future__ import annotations

import io

from bot.i18n import t
from bot.keyboards import domain_title
from bot.stats import Daily

#: One colour per domain, stable across charts (the colour-blind-safe Okabe-Ito palette).
COLOURS = {"legal": "#0072B2", "medical": "#009E73", "finance": "#E69F00", "base": "#999999"}
EXTRA = ("#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
SIZE_IN = (10.0, 6.0)
DPI = 100


def _colour(domain: str, others: list[str]) -> str:
    if domain in COLOURS:
        return COLOURS[domain]
    return EXTRA[others.index(domain) % len(EXTRA)]


def _plain(title: str) -> str:
    """A title without its emoji: the bundled DejaVu font has no glyphs for them."""
    return "".join(ch for ch in title if ch.isalnum() or ch in " -·'").strip()


def render(daily: Daily, lang: str = "en") -> bytes:
    """Two stacked-bar panels (answers, tokens) over the days of `daily`; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = list(range(len(daily.days)))
    domains = sorted(set(daily.answers) | set(daily.tokens), key=lambda d: (d == "base", d))
    others = [d for d in domains if d not in COLOURS]
    for ax, series, title in ((top, daily.answers, t(lang, "ch_answers")),
                              (bottom, daily.tokens, t(lang, "ch_tokens"))):
        base = [0] * len(x)
        for domain in domains:
            values = series.get(domain, [0] * len(x))
            label = _plain(domain_title(None if domain == "base" else domain, lang))
            ax.bar(x, values, bottom=base, color=_colour(domain, others), label=label, width=0.8)
            base = [b + v for b, v in zip(base, values)]
        ax.set_title(title, loc="left", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        if not any(base):
            ax.text(0.5, 0.5, t(lang, "ch_empty"), transform=ax.transAxes, ha="center", va="center",
                    color="#777777")
    ticks = [i for i in x if (len(x) - 1 - i) % 5 == 0]
    bottom.set_xticks(ticks, [daily.days[i].strftime("%d.%m") for i in ticks])
    if domains:
        top.legend(loc="upper left", fontsize=9, frameon=False, ncols=min(4, len(domains)))
    fig.suptitle(t(lang, "ch_title"), fontsize=13)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
