"""One voice: every lesson's prose uses the glossary's one Chinese term per concept.

lessons/glossary.md (术语表) is a table English | 中文 | 不用 | 另有所指. For every lesson, source
and student copy, each markdown cell is checked for the 不用 variants; a failure names the
lesson, the cell and the variant with its context. A variant inside the chosen term itself
(预填 inside 预填充) or inside a listed different concept (笔记 inside 论文笔记) does not count.
The entry 英文单用 forbids the bare English word in prose; code, math, URLs and anything in
parentheses (where the English term stands beside the Chinese one) are left out of that check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "lessons" / "glossary.md"
BARE_ENGLISH = "英文单用"
LESSONS = sorted(
    [*ROOT.glob("lessons/[01][0-9]_*.ipynb"), *ROOT.glob("lessons/source/[01][0-9]_*.ipynb")]
)


@dataclass(frozen=True)
class Term:
    english: str
    chinese: str
    avoid: tuple[str, ...]  # Chinese variants
    bare_english: bool  # the English word may not stand alone in prose
    other: tuple[str, ...]  # look-alikes that name a different concept


def split_list(cell: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in re.split(r"[、,，]", cell) if x.strip())


def parse_glossary(text: str) -> list[Term]:
    """The table rows after the header `| English | 中文 | 不用 | 另有所指 |`."""
    terms: list[Term] = []
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| English"):
            assert cells == ["English", "中文", "不用", "另有所指"], cells
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            in_table = in_table and line.startswith("|")
            continue
        if set(line) <= set("|-: "):
            continue
        english, chinese, avoid, other = cells
        variants = split_list(avoid)
        terms.append(
            Term(
                english=re.sub(r"\s*\(.*\)$", "", english),
                chinese=chinese,
                avoid=tuple(v for v in variants if v != BARE_ENGLISH),
                bare_english=BARE_ENGLISH in variants,
                other=split_list(other),
            )
        )
    return terms


TERMS = parse_glossary(GLOSSARY.read_text(encoding="utf-8"))


def without_code(md: str) -> str:
    """Markdown with code blocks, inline code, math, URLs and HTML tags blanked out."""
    md = re.sub(r"```.*?```", " ", md, flags=re.S)
    md = re.sub(r"`[^`\n]*`", " ", md)
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"\$[^$\n]*\$", " ", md)
    md = re.sub(r"https?://\S+", " ", md)
    return re.sub(r"<[^>\n]+>", " ", md)


def without_parentheses(text: str) -> str:
    """Text with (...) and （...） removed, innermost first."""
    for _ in range(4):
        text = re.sub(r"\([^()]*\)", " ", text)
        text = re.sub(r"（[^（）]*）", " ", text)
    return text


def bare_english_pattern(word: str) -> re.Pattern[str]:
    """The word (or its plural) standing alone: not part of an identifier, unit or compound."""
    return re.compile(
        r"(?<![A-Za-z0-9_\-/.])" + re.escape(word) + r"(?:s|es)?(?![A-Za-z0-9_\-/])",
        re.IGNORECASE,
    )


def violations(markdown: str, terms: list[Term] = TERMS) -> list[str]:
    """Each glossary variant found in one markdown cell, as 'variant -> term: …context…'."""
    found: list[str] = []
    text = without_code(markdown)
    allowed = {t.chinese for t in terms} | {o for t in terms for o in t.other}
    covered = [m.span() for a in allowed for m in re.finditer(re.escape(a), text)]
    for term in terms:
        for variant in term.avoid:
            for m in re.finditer(re.escape(variant), text):
                a, b = m.span()
                if any(c <= a and b <= d and (c, d) != (a, b) for c, d in covered):
                    continue
                found.append(f"{variant!r} -> {term.chinese!r}: …{context(text, a, b)}…")
        if term.bare_english:
            prose = without_parentheses(text)
            for m in bare_english_pattern(term.english).finditer(prose):
                ctx = context(prose, *m.span())
                found.append(f"bare {m.group()!r} -> {term.chinese!r}: …{ctx}…")
    return found


def context(text: str, a: int, b: int) -> str:
    return text[max(0, a - 15) : b + 15].replace("\n", " ")


def test_glossary_fixes_the_course_decisions():
    by_english = {t.english: t for t in TERMS}
    assert by_english["token"].chinese == "词元" and by_english["token"].bare_english
    assert by_english["kernel"].chinese == "核函数" and "内核" in by_english["kernel"].avoid
    assert by_english["the course notes"].chinese == "讲义"
    assert "论文笔记" in by_english["the course notes"].other
    assert by_english["prefill"].chinese == "预填充"
    assert by_english["batch"].chinese == "批"
    assert by_english["batching"].chinese == "批处理"
    assert by_english["throughput"].chinese == "吞吐量"
    assert by_english["latency"].chinese == "延迟"
    assert by_english["operator / op"].chinese == "算子"
    # One term per concept: no chosen term is another concept's banned variant.
    chosen = {t.chinese for t in TERMS}
    assert not chosen & {v for t in TERMS for v in t.avoid}
    assert len(chosen) == len(TERMS)


def test_checker_finds_variants_and_spares_code_parentheses_and_look_alikes():
    md = (
        "每个 token 都要读权重；这个内核很快，吞吐和时延都好。\n"
        "词元 (token) 与 `max_tokens`、$\\text{tokens/s}$、tokens/s 都可以。\n"
        "吞吐量、预填充、论文笔记、操作系统内核不算。\n"
        "```python\nkernel = 1  # 内核\n```\n"
    )
    found = violations(md)
    assert sorted(f.split(" ->")[0] for f in found) == [
        "'内核'",
        "'吞吐'",
        "'时延'",
        "bare 'token'",
    ]


def test_every_lesson_notebook_is_found():
    numbers = sorted({p.name[:2] for p in LESSONS})
    assert numbers == [f"{i:02d}" for i in range(16)]
    assert len(LESSONS) == 32


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: str(p.relative_to(ROOT / "lessons")))
def test_lesson_prose_follows_the_glossary(path: Path):
    nb = nbformat.read(path, as_version=4)
    problems = [
        f"{path.relative_to(ROOT)} cell {i} (id {cell.get('id')}): {v}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "markdown"
        for v in violations(cell.source)
    ]
    assert not problems, "glossary (lessons/glossary.md) variants:\n" + "\n".join(problems)


# Text that sends a student somewhere they cannot follow: the seed notes by file number (they are
# not in the repository) or the course's own CI machine and test harness.
MISSING_PLACES = re.compile(
    r"(?:笔记|讲义|notes?)[ -]?\(?0\d\d\b|seeds/|课程的 ?CI|CI 机器|CI machine|course machine"
    r"|(?<![\w-])nbval(?![\w-])",
    re.IGNORECASE,
)


def test_missing_place_pattern_finds_what_it_should():
    found = [
        m.group()
        for m in MISSING_PLACES.finditer(
            "笔记 003 说；讲义(002)；note 004；课程的 CI 机器只有 2 个核心；被 nbval 逐字核对；"
            "# the course machine is shared\n讲义里的例子；第 003 步；pytest --nbval-lax"
        )
    ]
    assert found == ["笔记 003", "讲义(002", "note 004", "课程的 CI", "nbval", "course machine"]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: str(p.relative_to(ROOT / "lessons")))
def test_lesson_sends_students_nowhere_they_cannot_follow(path: Path):
    """Sources, stored outputs included (a student reads those too)."""
    nb = nbformat.read(path, as_version=4)
    problems = [
        f"{path.relative_to(ROOT)} cell {i} (id {cell.get('id')}): {m.group()!r} in "
        f"…{context(text, *m.span())}…"
        for i, cell in enumerate(nb.cells)
        for text in [cell.source, *(o.get("text", "") for o in cell.get("outputs", []))]
        for m in MISSING_PLACES.finditer(text)
    ]
    assert not problems, "seed-note file numbers or CI/test-harness text:\n" + "\n".join(problems)
