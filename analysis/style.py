"""Figure style for the whole project: paper sizes, fonts, file formats and a fixed look per variant name.

Every figure is written at two widths, each as PDF and PNG:

- ``<stem>.pdf`` and ``<stem>.png``: two columns of a paper (7 in wide), legend right of the axes;
- ``<stem>_1col.pdf`` and ``<stem>_1col.png``: one column (3.25 in wide), legend below the axes.

Both are meant to be included at their native size, so the fonts (7-8 pt) stay readable in print.
Legends are placed outside the axes by matplotlib's constrained layout, so they never cover data.

Each axis value name (``mha``, ``swiglu``, ``rmsnorm``, ...) has one colour and one line style in
every figure. Colours are Okabe and Ito's colour-blind-safe palette. The baseline's names (``n4``,
``asgg``, ``dyt``, ``none``) are black and solid. The MLP, norm and position names differ within
their axis in both colour and line style, so a grid figure can encode one axis by colour and
another by line style. The attention names differ in colour, except that each N4-fused variant
(``n4-swa``) takes its base's colour with a dashed line. No two known names share both colour and
line style. Yellow, the palette's weakest colour on white, is left to names not listed here, which
get a colour and line style derived from a hash of the name: the same in every process and on
every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402

# Column and text widths of a typical two-column paper layout, in inches.
ONE_COLUMN_IN = 3.25
TWO_COLUMN_IN = 7.0

# Width variants written for every figure: file-name suffix -> width in inches.
WIDTHS = {"": TWO_COLUMN_IN, "_1col": ONE_COLUMN_IN}
FORMATS = ("pdf", "png")
PNG_DPI = 300

RC_PARAMS = {
    "font.size": 8,
    "axes.titlesize": 8,
    "figure.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.3,
    "grid.alpha": 0.5,
    "lines.linewidth": 1.2,
    "pdf.fonttype": 42,  # embed fonts as TrueType (Type 42) rather than Type 3
    "ps.fonttype": 42,
    "savefig.dpi": PNG_DPI,
}

# Okabe and Ito, "Color Universal Design" (2008).
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
BASELINE_COLOR = OKABE_ITO["black"]
BASELINE_LINEWIDTH = 1.8


@dataclass(frozen=True)
class VariantStyle:
    """The colour and matplotlib line style of one axis value name."""

    color: str
    linestyle: str


_K, _O, _S, _G, _Y, _B, _V, _P = (OKABE_ITO[name] for name in OKABE_ITO)

VARIANT_STYLES: dict[str, VariantStyle] = {
    # attention: the N4 key transform fused with a base shares that base's colour, dashed.
    "n4": VariantStyle(_K, "-"),
    "mha": VariantStyle(_B, "-"),
    "swa": VariantStyle(_O, "-"),
    "gqa": VariantStyle(_G, "-"),
    "mla": VariantStyle(_V, "-"),
    "n4-swa": VariantStyle(_O, "--"),
    "n4-gqa": VariantStyle(_G, "--"),
    "n4-mla": VariantStyle(_V, "--"),
    # mlp
    "asgg": VariantStyle(_K, "-"),
    "swiglu": VariantStyle(_S, "--"),
    "gelu": VariantStyle(_P, ":"),
    # norm
    "dyt": VariantStyle(_K, "-"),
    "layernorm": VariantStyle(_B, "-."),
    "rmsnorm": VariantStyle(_V, ":"),
    # position
    "none": VariantStyle(_K, "-"),
    "rope": VariantStyle(_P, "-."),
}
_FALLBACK_COLORS = (_B, _O, _G, _V, _S, _P, _Y)
_FALLBACK_LINESTYLES = ("-", "--", ":", "-.")


def variant_style(name: str) -> VariantStyle:
    """Return the fixed style of an axis value name; unknown names get a hash-derived one."""
    if name in VARIANT_STYLES:
        return VARIANT_STYLES[name]
    # sha256 rather than hash(), whose value for strings changes between Python processes.
    digest = hashlib.sha256(name.encode()).digest()
    return VariantStyle(_FALLBACK_COLORS[digest[0] % len(_FALLBACK_COLORS)], _FALLBACK_LINESTYLES[digest[1] % len(_FALLBACK_LINESTYLES)])


def _si_format(value: float, suffixes: tuple[tuple[float, str], ...]) -> str:
    for divisor, suffix in suffixes:
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def format_tokens(value: float, _position: int | None = None) -> str:
    """Format a token count for a tick label: 1.5M, 2B."""
    return _si_format(value, ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")))


def format_flops(value: float, _position: int | None = None) -> str:
    """Format a FLOP count for a tick label with SI prefixes: 3G is 3e9, 2T is 2e12."""
    return _si_format(value, ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")))


# The x axes of loss curves: history column -> (axis label with unit, tick label function). Each
# axis gets its own FuncFormatter, because matplotlib binds a formatter to the axis it is set on.
X_AXES = {
    "tokens": ("training tokens", format_tokens),
    "wall_s": ("wall-clock time (seconds)", None),
    "flops": ("training compute (FLOPs)", format_flops),
}
LOSS_LABELS = {
    "val/loss": "validation loss (nats/token)",
    "train/loss": "training loss (nats/token)",
}
FINAL_LOSS_LABEL = "final validation loss (nats/token)"


def paper_style():
    """Return a context manager that applies ``RC_PARAMS``; draw and save each figure inside it.

    matplotlib reads most of these settings when an artist is created, so the whole figure, not
    only its creation, must happen inside the context.
    """
    return plt.rc_context(RC_PARAMS)


def legend_location(width_in: float, labels: list[str] | tuple[str, ...] = ()) -> dict:
    """Return ``Figure.legend`` arguments that put the legend outside the axes.

    Right of the axes at two-column width. Below them at one-column width, in two columns when
    every label fits half the width, else one. The 22-character limit is an estimate for 7 pt text.
    The figure must use the constrained layout, which makes room for an "outside" legend.
    """
    if width_in >= TWO_COLUMN_IN:
        return {"loc": "outside right upper", "ncol": 1}
    short = all(len(label) <= 22 for label in labels)
    return {"loc": "outside lower center", "ncol": 2 if short else 1}


def new_figure(width_in: float, height_in: float, rows: int = 1, columns: int = 1, **subplot_options):
    """Create a figure with constrained layout and return (figure, 2-D array of axes); call inside ``paper_style()``."""
    figure, axes = plt.subplots(
        rows, columns, figsize=(width_in, height_in), layout="constrained", squeeze=False, **subplot_options
    )
    return figure, axes


def save_figure(figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``figure`` as ``<stem>.pdf`` and ``<stem>.png`` in ``out_dir``, close it and return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for extension in FORMATS:
        path = out_dir / f"{stem}.{extension}"
        figure.savefig(path, dpi=PNG_DPI)
        paths.append(path)
    plt.close(figure)
    return paths
