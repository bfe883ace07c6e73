"""Chinese text in matplotlib figures: pick an installed CJK font once per session.

The lessons title their charts in Chinese. matplotlib's default font (DejaVu Sans) has no CJK
glyphs, so without a CJK font every Chinese character renders as an empty box and matplotlib
warns once per glyph. `use_chinese_font` finds a CJK font that is installed, makes it the first
sans-serif choice, and says clearly which package to install when there is none.

matplotlib is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import os
import warnings

# Family names as matplotlib reports them, most likely first on the machines students use:
# Debian/Ubuntu (fonts-wqy-microhei, fonts-noto-cjk), Adobe's release, Windows, macOS.
CJK_FONTS: tuple[str, ...] = (
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "SimHei",
    "PingFang SC",
    "Microsoft YaHei",
    "Heiti SC",
    "Hiragino Sans GB",
    "Arial Unicode MS",
)

# Pieces of font file names (lower case) that hold one of the families above. Used only when
# matplotlib's font cache was built before the font was installed and so does not list it.
_CJK_FILE_HINTS: tuple[str, ...] = (
    "wqy",
    "notosanscjk",
    "notosanssc",
    "sourcehansans",
    "simhei",
    "msyh",
    "pingfang",
    "hiragino",
    "stheiti",
    "arialuni",
)

INSTALL_HINT = (
    "no Chinese (CJK) font found for matplotlib; Chinese titles and labels will show as boxes. "
    "Install one, e.g. `sudo apt-get install fonts-wqy-microhei` (Debian/Ubuntu), "
    "`sudo dnf install wqy-microhei-fonts` (Fedora) or Noto Sans CJK SC, then restart the kernel."
)

_warned = False


def _installed(candidates: tuple[str, ...]) -> str | None:
    """The first candidate family that matplotlib's font manager knows, or None."""
    from matplotlib import font_manager

    known = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in candidates if name in known), None)


def _register_system_cjk_fonts() -> None:
    """Add CJK font files that the system has but matplotlib's cached font list lacks.

    matplotlib caches the system's fonts the first time it runs (fontlist-*.json in
    MPLCONFIGDIR) and does not look again, so a font installed afterwards stays invisible.
    """
    from matplotlib import font_manager

    known_files = {f.fname for f in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts():
        base = os.path.basename(path).lower().replace("-", "").replace("_", "")
        if path in known_files or not any(h in base for h in _CJK_FILE_HINTS):
            continue
        try:
            font_manager.fontManager.addfont(path)
        except (OSError, RuntimeError, ValueError):
            continue  # an unreadable file is no font; try the next one


def use_chinese_font(candidates: tuple[str, ...] = CJK_FONTS) -> str | None:
    """Make an installed CJK font matplotlib's first sans-serif font and return its name.

    Also turns off the Unicode minus sign (U+2212), which many CJK fonts lack, so negative tick
    labels still render. Returns None, with one warning per session that names the package to
    install, when no candidate font is installed; figures still draw, with boxes for Chinese.
    """
    global _warned
    import matplotlib

    name = _installed(candidates)
    if name is None:
        _register_system_cjk_fonts()
        name = _installed(candidates)
    if name is None:
        if not _warned:
            warnings.warn(INSTALL_HINT, RuntimeWarning, stacklevel=2)
            _warned = True
        return None
    rest = [f for f in matplotlib.rcParams["font.sans-serif"] if f != name]
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["font.sans-serif"] = [name, *rest]
    matplotlib.rcParams["axes.unicode_minus"] = False
    return name
