"""The check of a lesson exercise (练习): three outcomes a student and a grader can tell apart.

A lesson's exercise is a stub the student fills in, followed by a check cell:

    with check(1, "实现上面的 weights_gb"):
        assert weights_gb(7e9, 16) == 14.0, "提示：..."

- the stub still raises NotImplementedError: print "练习 1 尚未完成 (not done yet)" and what to
  do, and let the lesson go on running as a demo;
- the checks pass: print "练习 1 通过 (passed)";
- anything else (a failed assert, or the student's code raising) is a wrong answer: raise an
  AssertionError naming the exercise, so the cell fails loudly and a grader sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def check(number: int, todo: str) -> Iterator[None]:
    """Run an exercise's checks; see the module docstring for the three outcomes."""
    try:
        yield
    except NotImplementedError:
        print(f"练习 {number} 尚未完成 (not done yet)：{todo}")
        return
    except AssertionError as exc:
        raise AssertionError(f"练习 {number} 未通过 (failed)：{exc}") from exc
    except Exception as exc:
        raise AssertionError(
            f"练习 {number} 未通过 (failed)：你的代码抛出了 {type(exc).__name__}: {exc}"
        ) from exc
    print(f"练习 {number} 通过 (passed) ✓")
