"""minillm.ui.figures: an installed CJK font is found and Chinese text really renders with it;
with no CJK font the caller gets None and one clear warning naming the package to install."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("MPLCONFIGDIR", "/tmp/mpl")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402

from minillm.ui import figures  # noqa: E402

CJK_TEXT = "算术强度 (arithmetic intensity) 词元 −1"


def system_has_cjk_font() -> bool:
    """Whether fontconfig's directories hold a CJK font file (independent of matplotlib's cache)."""
    hints = ("wqy", "notosanscjk", "sourcehansans", "simhei", "msyh", "pingfang")
    for path in font_manager.findSystemFonts():
        base = os.path.basename(path).lower().replace("-", "").replace("_", "")
        if any(h in base for h in hints):
            return True
    return False


def draw_with_title(text: str) -> list[str]:
    """Render a small figure titled `text`; the warnings matplotlib raised while drawing."""
    fig, ax = plt.subplots(figsize=(3, 2))
    try:
        ax.set_title(text)
        ax.plot([-1, 1], [-2, 2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.canvas.draw()
        return [str(w.message) for w in caught]
    finally:
        plt.close(fig)


def test_installed_cjk_font_is_used_and_renders_chinese():
    if not system_has_cjk_font():
        if os.environ.get("CI"):
            pytest.fail("CI needs a CJK font: make setup installs fonts-wqy-microhei")
        pytest.skip("no CJK font installed (sudo apt-get install fonts-wqy-microhei)")
    with matplotlib.rc_context():
        # Without the font, DejaVu Sans renders the title and reports each missing glyph.
        matplotlib.rcParams["font.sans-serif"] = ["DejaVu Sans"]
        assert any("missing from font" in m for m in draw_with_title(CJK_TEXT))

        name = figures.use_chinese_font()
        assert name in figures.CJK_FONTS
        assert matplotlib.rcParams["font.sans-serif"][0] == name
        assert matplotlib.rcParams["axes.unicode_minus"] is False
        chosen = font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]))
        assert font_manager.get_font(chosen).family_name == name
        missing = [m for m in draw_with_title(CJK_TEXT) if "missing from font" in m]
        assert missing == []
        # A second call is idempotent: the font is not listed twice.
        assert figures.use_chinese_font() == name
        assert matplotlib.rcParams["font.sans-serif"].count(name) == 1


def test_no_cjk_font_warns_once_with_the_package_to_install(monkeypatch):
    monkeypatch.setattr(figures, "_warned", False)
    absent = ("No Such CJK Font 1", "No Such CJK Font 2")
    with matplotlib.rc_context():
        before = list(matplotlib.rcParams["font.sans-serif"])
        with pytest.warns(RuntimeWarning, match="fonts-wqy-microhei"):
            assert figures.use_chinese_font(absent) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert figures.use_chinese_font(absent) is None  # no second warning
        assert matplotlib.rcParams["font.sans-serif"] == before
