"""`minillm grade` on the real homework, and the mutants every graded part must catch.

1. Released copies score 0 and the instructor sources full marks, through `minillm grade`.
2. Parts are graded on their own (hw1: parts 1-2 unfinished, 3-4 still score; hw2: history
   unfinished, the chat tool still scores on both models), and graders that were edited,
   deleted or replaced are restored from the release and reported.
3. Mutation tests: for every auto-graded part, plausible wrong implementations (MUTANTS). The
   source notebook runs once per assignment in one kernel; right after each part's grader,
   each mutant is defined over the part's answer (the source's answer cell with one edit),
   the part's grader runs again and must fail, and the source's answer is restored.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from minillm.grading import grade_notebook
from minillm.grading.execute import run_notebook
from minillm.grading.markers import parse_grade_marker

REPO = Path(__file__).resolve().parent.parent
HOMEWORK = REPO / "homework"
ASSIGNMENTS = ("hw1_deploy_api", "hw2_modelscope_chat", "hw3_compression")


@dataclass(frozen=True)
class Mutant:
    """A wrong answer: the source's answer cell `cell` with `old` replaced by `new`."""

    part: str
    name: str
    cell: str
    old: str
    new: str


MUTANTS = {
    "hw1_deploy_api": [
        Mutant("request_validation", "temperature_2_rejected", "hw1-05",
               "if not 0 <= temperature <= 2:", "if not 0 <= temperature < 2:"),
        Mutant("request_validation", "stream_not_checked", "hw1-05",
               "if not isinstance(stream, bool):", "if False:"),
        Mutant("request_validation", "extra_keys_kept", "hw1-05",
               'messages.append({"role": message["role"], "content": message["content"]})',
               "messages.append(dict(message))"),
        Mutant("chat_template", "no_default_system", "hw1-09",
               'if not messages or messages[0]["role"] != "system":', "if False:"),
        Mutant("chat_template", "no_generation_prompt", "hw1-09",
               'return turns + "<|im_start|>assistant\\n"', "return turns"),
        Mutant("chat_template", "no_newline_between_turns", "hw1-09",
               "<|im_end|>\\n", "<|im_end|>"),
        Mutant("chat_completion", "completion_tokens_off_by_one", "hw1-12",
               "len(completion.token_ids)", "len(completion.token_ids) - 1"),
        Mutant("chat_completion", "missing_role", "hw1-12",
               '"message": {"role": "assistant", "content": completion.text}',
               '"message": {"content": completion.text}'),
        Mutant("chat_completion", "finish_reason_always_stop", "hw1-12",
               '"finish_reason": completion.finish_reason', '"finish_reason": "stop"'),
        Mutant("streaming", "no_done", "hw1-15", 'yield "data: [DONE]\\n\\n"', "return"),
        Mutant("streaming", "no_role_chunk", "hw1-15",
               'yield event({"role": "assistant", "content": ""})', "pass"),
        Mutant("streaming", "finish_reason_on_every_chunk", "hw1-15",
               'yield event({"content": completion.text})',
               'yield event({"content": completion.text}, completion.finish_reason)'),
    ],
    "hw2_modelscope_chat": [
        Mutant("model_resolution", "error_not_wrapped", "hw2-03",
               "raise ModelUnavailable(message) from exc", "raise"),
        Mutant("model_resolution", "bare_id_not_rewritten", "hw2-03",
               'name = f"modelscope:{choice}"', "name = choice"),
        Mutant("model_resolution", "resolve_message_lost", "hw2-03",
               "message = str(exc)", 'message = "model not found"'),
        Mutant("history", "drops_newest_turn", "hw2-08", "turns.pop(0)", "turns.pop()"),
        Mutant("history", "drops_single_messages", "hw2-08",
               'if m["role"] == "user" or not turns:', "if True:"),
        Mutant("history", "budget_off_by_one", "hw2-08",
               "<= max_prompt_tokens", "< max_prompt_tokens"),
        Mutant("gradio_chat", "yields_deltas", "hw2-11",
               'reply += output.outputs[0].text\n        yield reply',
               "yield output.outputs[0].text"),
        Mutant("gradio_chat", "no_system_prompt", "hw2-11",
               "MAX_PROMPT_TOKENS, count_prompt_tokens)",
               "MAX_PROMPT_TOKENS, count_prompt_tokens)[1:]"),
        Mutant("gradio_chat", "forgets_history", "hw2-11",
               "build_messages(message, history,", "build_messages(message, [],"),
        Mutant("second_model", "model_bound_at_definition", "hw2-11",
               "def respond(message: str, history: list[dict]) -> Iterator[str]:",
               "def respond(message: str, history: list[dict], llm=llm) -> Iterator[str]:"),
        Mutant("second_model", "cuts_at_smollm2_end_token", "hw2-11",
               "yield reply", 'yield reply.split("<|im_end|>")[0]'),
    ],
    "hw3_compression": [
        Mutant("int4_groupwise", "scale_over_16", "hw3-08",
               "scale = (groups.amax(dim=-1) - minimum) / 15",
               "scale = (groups.amax(dim=-1) - minimum) / 16"),
        Mutant("int4_groupwise", "floor_not_round", "hw3-08", "torch.round(", "torch.floor("),
        Mutant("int4_groupwise", "no_constant_group_fallback", "hw3-08",
               "scale = torch.where(scale > 0, scale, torch.ones_like(scale))",
               "scale = scale.clamp_min(1e-12)"),
        Mutant("magnitude_pruning", "prunes_largest", "hw3-13",
               "largest=False", "largest=True"),
        Mutant("magnitude_pruning", "modifies_input", "hw3-13", "pruned = w.clone()", "pruned = w"),
        Mutant("magnitude_pruning", "k_truncated", "hw3-13",
               "k = round(sparsity * w.numel())", "k = int(sparsity * w.numel())"),
        Mutant("semi_structured_2_4", "keeps_smallest", "hw3-15",
               "topk(2, dim=-1)", "topk(2, dim=-1, largest=False)"),
        Mutant("semi_structured_2_4", "signed_not_abs", "hw3-15",
               "groups.abs().topk(", "groups.topk("),
        Mutant("distillation_loss", "no_t_squared", "hw3-20",
               "alpha * temperature**2 * kl", "alpha * kl"),
        Mutant("distillation_loss", "teacher_not_detached", "hw3-20",
               "teacher_logits.detach()", "teacher_logits"),
        Mutant("distillation_loss", "kl_reversed", "hw3-20",
               "(log_p_teacher.exp() * (log_p_teacher - log_p_student))",
               "(log_p_student.exp() * (log_p_student - log_p_teacher))"),
    ],
}  # fmt: skip


def source_path(assignment: str) -> Path:
    return HOMEWORK / "source" / assignment / f"{assignment}.ipynb"


def release_path(assignment: str) -> Path:
    return HOMEWORK / assignment / f"{assignment}.ipynb"


def points(report) -> dict[str, int]:
    return {p.name: p.points for p in report.parts}


def edited(nb, **sources: str | None):
    """A copy of `nb` with cells (by id, '_' for '-') given new sources, or deleted (None)."""
    nb = copy.deepcopy(nb)
    keys = {key.replace("_", "-"): value for key, value in sources.items()}
    nb.cells = [c for c in nb.cells if not (c.id in keys and keys[c.id] is None)]
    for cell in nb.cells:
        if keys.get(cell.id) is not None:
            cell.source = keys[cell.id]
    return nb


def stubbed(nb, cell_id: str) -> str:
    """The source answer cell `cell_id` with every function body's solution unwritten."""
    source = next(c.source for c in nb.cells if c.id == cell_id)
    out, skipping = [], False
    for line in source.splitlines(keepends=True):
        if "### BEGIN SOLUTION" in line:
            out.append(line[: len(line) - len(line.lstrip())] + "raise NotImplementedError\n")
            skipping = True
        elif "### END SOLUTION" in line:
            skipping = False
        elif not skipping:
            out.append(line)
    return "".join(out)


# ---- 1. release and source ------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_released_copy_scores_zero_and_the_source_full_marks(assignment):
    untouched = grade_notebook(release_path(assignment), HOMEWORK)
    assert untouched.total == 0 and untouched.max > 0, untouched.table()
    assert all(p.error.startswith("NotImplementedError") for p in untouched.parts), (
        untouched.table()
    )
    assert not any(h.present for h in untouched.by_hand)
    assert untouched.tampered == [] and untouched.missing_answers == []

    source = grade_notebook(source_path(assignment), HOMEWORK)
    assert source.total == source.max == untouched.max, source.table()
    assert all(h.present for h in source.by_hand) and source.tampered == []


# ---- 2. parts on their own; tampering -------------------------------------------------------


def test_hw1_unfinished_parts_1_and_2_leave_3_and_4_and_graders_are_restored(tmp_path):
    source = nbformat.read(source_path("hw1_deploy_api"), as_version=4)
    theirs = edited(
        source,
        hw1_05=stubbed(source, "hw1-05"),
        hw1_09=stubbed(source, "hw1-09"),
        hw1_13=None,  # deleted
        hw1_16='# GRADE: streaming (5 points)\nprint("streaming OK")',  # replaced
    )
    path = tmp_path / "hw1_deploy_api.ipynb"
    nbformat.write(theirs, path)
    report = grade_notebook(path, HOMEWORK)
    assert points(report) == {
        "request_validation": 0,
        "chat_template": 0,
        "chat_completion": 4,
        "streaming": 5,
    }, report.table()
    assert sorted(report.tampered) == ["hw1-13", "hw1-16"]


def test_hw2_chat_tool_scores_without_part_2_on_both_models(tmp_path):
    source = nbformat.read(source_path("hw2_modelscope_chat"), as_version=4)
    theirs = edited(source, hw2_08=stubbed(source, "hw2-08"), hw2_13b="print('fine')")
    path = tmp_path / "mine.ipynb"
    nbformat.write(theirs, path)
    report = grade_notebook(path, HOMEWORK)
    assert points(report) == {
        "model_resolution": 4,
        "history": 0,
        "gradio_chat": 3,
        "second_model": 2,
    }, report.table()
    assert report.tampered == ["hw2-13b"]


def test_hw3_replaced_graders_score_zero_and_filler_notes_earn_nothing(tmp_path):
    release = nbformat.read(release_path("hw3_compression"), as_version=4)
    theirs = edited(
        release,
        hw3_09="# GRADE: int4_groupwise (4 points)\npass",
        hw3_14="pass",
        hw3_16=None,
        hw3_21="# GRADE: distillation_loss (40 points)\nassert True",
    )
    nbformat.write(theirs, tmp_path / "hw3_compression.ipynb")
    template = (HOMEWORK / "hw3_compression" / "notes.md").read_text("utf-8")
    filler = template.replace("TODO: 在这里写你自己的内容 (write your own text here)", "啊" * 40)
    (tmp_path / "notes.md").write_text(filler, "utf-8")
    report = grade_notebook(tmp_path / "hw3_compression.ipynb", HOMEWORK)
    assert report.total == 0 and report.max == 14, report.table()
    assert sorted(report.tampered) == ["hw3-09", "hw3-14", "hw3-16", "hw3-21"]
    assert [h.present for h in report.by_hand] == [True, True, True]  # present, and 0 points


# ---- 3. mutants -----------------------------------------------------------------------------


def mutation_notebook(assignment: str):
    """The source, with each mutant's answer, grader re-run and restore after its part."""
    nb = nbformat.read(source_path(assignment), as_version=4)
    by_id = {cell.id: cell for cell in nb.cells}
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        part = parse_grade_marker(cell.source) if cell.cell_type == "code" else None
        for mutant in (m for m in MUTANTS[assignment] if part and m.part == part.name):
            answer = by_id[mutant.cell].source
            assert answer.count(mutant.old) == 1, f"{mutant.name}: edit not found once"
            mutated = new_code_cell(answer.replace(mutant.old, mutant.new))
            mutated["id"] = f"mutant-{mutant.name}"
            grader = copy.deepcopy(cell)
            grader["id"] = f"grade-{mutant.name}"
            restore = copy.deepcopy(by_id[mutant.cell])
            restore["id"] = f"restore-{mutant.name}"
            cells += [mutated, grader, restore]
    nb.cells = cells
    return nb


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_every_mutant_loses_its_part(assignment, tmp_path):
    nb = mutation_notebook(assignment)
    for path in (HOMEWORK / "source" / assignment).iterdir():
        if path.is_file() and path.suffix != ".ipynb":
            shutil.copy(path, tmp_path / path.name)
    results = run_notebook(nb, tmp_path, timeout_of=lambda cell: 600)
    status = {cell.id: results[i] for i, cell in enumerate(nb.cells) if i in results}

    parts = [parse_grade_marker(c.source) for c in nb.cells if c.cell_type == "code"]
    auto = {p.name for p in parts if p is not None and not p.by_hand}
    covered = {m.part for m in MUTANTS[assignment]}
    assert covered == auto, "every auto-graded part needs mutants"
    for part in covered:
        assert sum(m.part == part for m in MUTANTS[assignment]) >= 2, part

    broken = [f"{cid}: {r.status} {r.error}" for cid, r in status.items()
              if not cid.startswith("grade-") and not r.passed]  # fmt: skip
    assert not broken, "the source itself must pass everywhere:\n" + "\n".join(broken)
    survivors = []
    for mutant in MUTANTS[assignment]:
        assert status[f"mutant-{mutant.name}"].passed, status[f"mutant-{mutant.name}"].error
        assert status[f"restore-{mutant.name}"].passed
        if status[f"grade-{mutant.name}"].passed:
            survivors.append(f"{mutant.part}: {mutant.name}")
    assert not survivors, "mutants the graders did not catch:\n" + "\n".join(survivors)
