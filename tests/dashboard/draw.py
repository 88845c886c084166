#!/usr/bin/env python3
"""Draws the dashboard's panels from the series the PromQL program wrote.

    draw.py SERIES.json OUT.png [--note TEXT]

Each panel sits where its gridPos puts it on Grafana's 24-column grid, under
its row, with its title and unit; a time series panel draws one line per
series with its legend, a stat panel the last value of each. A panel with
no series says "No data", as Grafana does. Matplotlib with the Agg backend:
no display needed.
"""

import argparse
import datetime as dt
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# Grafana's dark theme and its classic palette.
BG, PANEL, TEXT, DIM, GRID = "#111217", "#181b1f", "#ccccdc", "#8e8e9e", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2",
           "#b877d9", "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17",
           "#890f02", "#0a437c", "#6d1f62", "#584477"]

COLS = 24
COL_IN = 0.78  # inches per grid column
ROW_IN = 0.33  # inches per grid row (Grafana: 30 px)


def si(v, suffix=""):
    if v == 0:
        return "0" + suffix
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= f:
            return f"{v / f:.3g}{p}{suffix}"
    return f"{v:.3g}{suffix}"


def iec(v):
    for f, p in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(v) >= f:
            return f"{v / f:.3g} {p}"
    return f"{v:.3g} B"


def seconds(v):
    if v == 0:
        return "0"
    if abs(v) < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if abs(v) < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def fmt(unit):
    """Grafana's unit ids as the dashboard uses them."""
    return {
        "percentunit": lambda v: f"{v * 100:.3g}%",
        "bytes": iec,
        "s": seconds,
        "ops": lambda v: si(v, " ops/s"),
        "reqps": lambda v: si(v, " req/s"),
    }.get(unit, si)


def value(v):
    return float(v)  # "NaN", "+Inf" and "-Inf" are strings in the JSON


def lines(series, step):
    """The series' points, broken where a step has no value (Grafana does not
    connect across missing points by default)."""
    xs, ys, last = [], [], None
    for t, v in series["points"]:
        v = value(v)
        if last is not None and t - last > 1.5 * step:
            xs.append(dt.datetime.fromtimestamp(last + step, dt.timezone.utc))
            ys.append(math.nan)
        xs.append(dt.datetime.fromtimestamp(t, dt.timezone.utc))
        ys.append(v if math.isfinite(v) else math.nan)
        last = t
    return xs, ys


def parse_step(s):
    n, total = "", 0
    for c in s:
        if c.isdigit():
            n += c
        else:
            total += int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[c]
            n = ""
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("series")
    ap.add_argument("out")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    d = json.load(open(args.series))
    step = parse_step(d["step"])
    t0 = dt.datetime.fromtimestamp(d["start"], dt.timezone.utc)
    t1 = dt.datetime.fromtimestamp(d["end"], dt.timezone.utc)

    header = 2.4  # grid rows above the first one: title and how it was made
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in d["panels"]) + header
    W, H = COLS * COL_IN, height * ROW_IN
    fig = plt.figure(figsize=(W, H), facecolor=BG)
    plt.rcParams.update({"font.size": 8, "text.color": TEXT, "axes.labelcolor": TEXT,
                         "xtick.color": DIM, "ytick.color": DIM})

    def rect(x, y, w, h):
        """Figure coordinates of a grid rectangle (y from the top)."""
        return (x / COLS, 1 - (y + header + h) / height, w / COLS, h / height)

    fig.text(0.006, 1 - 0.55 / height, f"{d['dashboard']}  ·  Agent: All ({', '.join(d['instances'])})",
             fontsize=15, weight="bold", va="top")
    sub = (f"{t0:%Y-%m-%d %H:%M:%S} → {t1:%H:%M:%S} UTC  ·  {d['scrapes']} scrapes every {d['scrape_interval']}  ·  "
           f"range queries: step {d['step']}, $__rate_interval {d['rate_interval']}  ·  "
           "PromQL evaluated by Prometheus' engine (tests/dashboard/go), drawn by tests/dashboard/draw.py")
    fig.text(0.006, 1 - 1.35 / height, sub, fontsize=9, color=DIM, va="top")
    if args.note:
        fig.text(0.006, 1 - 1.95 / height, args.note, fontsize=9, color=DIM, va="top")

    for r in d["rows"]:
        fig.text(0.006, 1 - (r["y"] + header + 0.5) / height, "▾ " + r["title"],
                 fontsize=11, weight="bold", va="center")

    pad_x, pad_y = 0.12, 0.1  # grid units between panels
    for p in d["panels"]:
        g = p["gridPos"]
        x, y, w, h = g["x"] + pad_x, g["y"] + pad_y, g["w"] - 2 * pad_x, g["h"] - 2 * pad_y
        bg = fig.add_axes(rect(x, y, w, h), facecolor=PANEL)
        bg.set_xticks([])
        bg.set_yticks([])
        for s in bg.spines.values():
            s.set_color(GRID)
        bg.text(0.01, 0.985, p["title"], transform=bg.transAxes, fontsize=10, weight="bold", va="top")
        series = [s for t in p["targets"] for s in (t["series"] or [])]
        f = fmt(p["unit"])
        if not series:
            bg.text(0.5, 0.5, "No data", transform=bg.transAxes, ha="center", va="center", color=DIM, fontsize=12)
            continue
        if p["type"] == "stat":
            n = len(series)
            for i, s in enumerate(series):
                v = value(s["points"][-1][1])
                cx = (i + 0.5) / n
                bg.text(cx, 0.45, f(v) if math.isfinite(v) else str(v), transform=bg.transAxes,
                        ha="center", va="center", fontsize=26, weight="bold", color=PALETTE[i % len(PALETTE)])
                bg.text(cx, 0.15, s["legend"], transform=bg.transAxes, ha="center", color=DIM, fontsize=9)
            continue
        # The plot within the panel: below the title, above the legend.
        ncol = 4 if len(series) > 6 else 3 if len(series) > 4 else 2
        legend_rows = min(math.ceil(len(series) / ncol), 4)
        legend_h = 0.42 * legend_rows + 0.25
        ticks_h = 0.6  # the time axis' labels, between the plot and the legend
        ax = fig.add_axes(rect(x + 1.1, y + 0.9, w - 1.35, h - 0.9 - ticks_h - legend_h), facecolor=PANEL)
        for i, s in enumerate(series):
            xs, ys = lines(s, step)
            ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], lw=1.4, label=s["legend"] or "{}")
        ax.set_xlim(t0, t1)
        finite = [value(v) for s in series for _, v in s["points"] if math.isfinite(value(v))]
        if all(v >= 0 for v in finite):
            ax.set_ylim(bottom=0)  # as Grafana's soft minimum for non-negative data
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, f=f: f(v)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.timezone.utc))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=8, interval_multiples=True))
        ax.tick_params(labelsize=7, length=0)
        ax.grid(color=GRID, lw=0.6)
        for s in ax.spines.values():
            s.set_visible(False)
        shown = series[: ncol * 4]
        handles = ax.get_lines()[: len(shown)]
        more = len(series) - len(shown)
        labels = [s["legend"] for s in shown]
        if more:
            labels[-1] += f"  (+{more} more)"
        bg.legend(handles, labels, loc="lower left", ncol=ncol, frameon=False, fontsize=7,
                  handlelength=1.2, columnspacing=1.2, borderaxespad=0.3, labelcolor=TEXT)

    fig.savefig(args.out, dpi=90, facecolor=BG)
    print(f"[dashboard] drew {len(d['panels'])} panels into {args.out}")


if __name__ == "__main__":
    main()
