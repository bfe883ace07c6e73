"""Lesson exercises (练习): the structure, the generated student copies, and what every check does.

A lesson's exercise is a code cell tagged `exercise` (a function the student writes) followed
by a code cell tagged `exercise-check`. Solutions live in lessons/source/ inside solution
regions; lessons/ holds the generated student copies (scripts/make_lesson_copies.py). Here:

- every lesson has at least two exercises, except those listed in PENDING (exactly those);
- the copies are what the generator makes from the sources, and were run after generating;
- each exercise with its check runs on its own (a fresh namespace, no earlier lesson cell):
  the solution passes, the student stub only reports "尚未完成" (NotImplementedError), and a
  wrong answer (the solution replaced by `return None`) fails with an AssertionError;
- no later cell uses what an exercise defines, so the lesson also runs as a demo with stubs
  (nbval runs every lesson in `make test`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from minillm.ui.exercises import check

REPO = Path(__file__).resolve().parent.parent
LESSONS = REPO / "lessons"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
WRONG_ANSWER = "return None  # a wrong answer"
# Lessons that have no exercises yet: the test fails when this is not exactly that set, so it
# can only shrink (every lesson has its exercises now).
PENDING: set[str] = set()


# Plausible mistakes, each a (text in the solution, replacement) edit: every exercise has at
# least one, and each must fail its check (besides the `return None` answer every one gets).
PLAUSIBLY_WRONG: dict[str, list[list[tuple[str, str]]]] = {
    "00_overview/1": [[("n_params * bits / 8 / 1e9", "n_params * bits / 1e9")]],
    "00_overview/2": [[("(n_params * bits / 8)", "(n_params * bits)")]],
    "01_transformer_inference/1": [
        [("x[..., : d // 2], x[..., d // 2 :]", "x[..., 0::2], x[..., 1::2]")],  # GPT-J pairs
        [("positions.double()[:, None]", "torch.arange(len(positions)).double()[:, None]")],
    ],
    "01_transformer_inference/2": [
        [("/ dim**0.5", "/ dim")],
        [
            ("k.repeat_interleave(group, dim=1)", "k.repeat(1, group, 1)"),
            ("v.repeat_interleave(group, dim=1)", "v.repeat(1, group, 1)"),
        ],  # head h -> h % KvH
    ],
    "02_sampling/1": [
        [("logits / temperature", "logits * temperature")],
        [("z = z - z.max()", "z = z")],  # overflows at a low temperature
    ],
    "02_sampling/2": [[("mass_above >= top_p", "sorted_probs.cumsum(0) >= top_p")]],
    "03_kv_cache_and_memory/1": [[("2 * num_layers", "num_layers")]],
    "03_kv_cache_and_memory/2": [
        [
            (
                "int(room // (kv_bytes_per_token * seq_len))",
                "round(room / (kv_bytes_per_token * seq_len))",
            )
        ],
        [("if room < 0:\n        return 0\n", "")],
    ],
    "04_numba_cpu_kernels/1": [
        [("(byte & 0x0F)", "(TMP)"), ("(byte >> 4)", "(byte & 0x0F)"), ("(TMP)", "(byte >> 4)")]
    ],
    "04_numba_cpu_kernels/2": [[("np.float32(qs[b, j])", "np.float32(np.uint8(qs[b, j]))")]],
    "05_numba_cuda_kernels/1": [
        [("(n + threads_per_block - 1) // threads_per_block", "n // threads_per_block")],
        [("block_idx * block_dim + thread_idx", "thread_idx * block_dim + block_idx")],
    ],
    "05_numba_cuda_kernels/2": [
        [
            (
                "range(cuda.grid(1), out.shape[0], cuda.gridsize(1))",
                "range(cuda.grid(1), cuda.grid(1) + 1)",
            )
        ]
    ],
    "06_paged_attention/1": [
        [("block_table[p // block_size] * block_size", "p // block_size * block_size")]
    ],
    "06_paged_attention/2": [
        [
            (
                "-(-(num_computed + num_new) // block_size)",
                "(num_computed + num_new) // block_size + 1",
            )
        ],
        [("free_blocks.pop(0)", "free_blocks.pop()")],
    ],
    "07_continuous_batching/1": [
        [
            (
                "            if not chunked_prefill:\n                break",
                "            if not chunked_prefill:\n                continue",
            )
        ],
        [("running = len(running_left)", "running = 0")],
    ],
    "07_continuous_batching/2": [[("if left > 1]", "if left > 0]")]],
    "08_prefix_caching/1": [
        [("parent = chain_hash(parent,", "parent = chain_hash(None,")],  # not chained
        [("range(len(token_ids) // block_size)", "range(-(-len(token_ids) // block_size))")],
    ],
    "08_prefix_caching/2": [
        [("range((len(prompt) - 1) // block_size)", "range(len(prompt) // block_size)")],
        [("parent = chain_hash(parent,", "parent = chain_hash(None,")],  # each block alone
    ],
    "09_quantization/1": [
        [
            (
                "    whole = np.floor(np.abs(scaled))\n"
                "    q = (np.sign(scaled) * (whole + (np.abs(scaled) - whole >= 0.5))).astype(np.int8)",
                "    q = np.round(scaled).astype(np.int8)",  # halves to even
            )
        ],
        [("/ np.float32(127)", "/ np.float32(128)")],
    ],
    "09_quantization/2": [
        [
            (
                "torch.log_softmax(logits.double(), dim=-1)",
                "torch.log(torch.softmax(logits, dim=-1))",
            )
        ],
        [("torch.exp(nll.mean())", "torch.exp(nll).mean()")],
    ],
    "10_pruning/1": [
        [("groups.topk(2, dim=-1).indices", "groups.topk(2, dim=-1, largest=False).indices")],
        [  # every (in/4)-th weight grouped, not 4 neighbours
            (
                "w.abs().reshape(w.shape[0], -1, 4)",
                "w.abs().reshape(w.shape[0], 4, -1).transpose(1, 2)",
            )
        ],
    ],
    "10_pruning/2": [
        [("x.norm(dim=0)[None, :]", "x.abs().mean(dim=0)[None, :]")],
        [  # compared over the whole matrix, not within each row
            (
                "keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)",
                "keep.view(-1)[scores.flatten().topk(k * w.shape[0], largest=False).indices] = False",
            )
        ],
    ],
    "11_distillation/1": [
        [
            (
                "F.log_softmax(s / T, dim=-1).gather(1, t_ids)",
                "F.log_softmax(s.gather(1, t_ids) / T, dim=-1)",
            )
        ],
        [("alpha * T**2 * kl", "alpha * kl")],
    ],
    "11_distillation/2": [
        [("alpha * T * (q_T - p_T) / N", "alpha * T**2 * (q_T - p_T) / N")],
        [("(torch.softmax(s, dim=-1) - onehot) / N", "(torch.softmax(s, dim=-1) - onehot)")],
    ],
    "12_serving_api/1": [
        [('                if data == "[DONE]":\n                    return deltas\n', "")],
        [("buffer += chunk\n", 'buffer += chunk.decode("utf-8", errors="replace").encode()\n')],
        [("if text:", "if text is not None:")],
    ],
    "12_serving_api/2": [
        [('0 < body["top_p"] <= 1', '0 <= body["top_p"] <= 1')],
        [
            ('body["temperature"] >= 0)', '0 <= body["temperature"] <= 2)')
        ],  # OpenAI's documented cap
        [("isinstance(body[name], int) and body[name] >= 1", "body[name] >= 1")],
    ],
    "13_benchmark_and_monitoring/1": [
        [("pos = (len(xs) - 1) * q / 100", "pos = min(len(xs) * q / 100, len(xs) - 1)")],
        [
            ("return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)", "return xs[round(pos)]")
        ],  # nearest rank
        [("xs = sorted(values)", "xs = list(values)")],
    ],
    "13_benchmark_and_monitoring/2": [
        [("/ (output_tokens - 1)", "/ output_tokens")],
        [("(end - chunk_times[0])", "(end - start)")],  # TTFT counted in
    ],
    "14_distributed_inference/1": [
        [("partials.append(h @ w_down[:, mine].T)", "partials.append(h @ w_down[:, mine].T / tp)")],
        [("h @ w_down[:, mine].T", "h @ w_down[mine].T")],  # down split like up: by output
    ],
    "14_distributed_inference/2": [
        [("lse = torch.logaddexp(lse_a, lse_b)", "lse = torch.maximum(lse_a, lse_b)")],
        [
            (
                "out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]",
                "(out_a + out_b) / 2",
            )
        ],
    ],
    "15_gateway_and_choosing_a_stack/1": [
        [
            (
                "bisect.bisect(hashes, stable_hash(key)) % len(points)",
                "bisect.bisect(hashes, stable_hash(key))",
            )
        ],
        [  # hash modulo the number of upstreams: no ring
            (
                "return points[bisect.bisect(hashes, stable_hash(key)) % len(points)][1]",
                "return sorted(names)[stable_hash(key) % len(names)]",
            )
        ],
    ],
    "15_gateway_and_choosing_a_stack/2": [
        [("if t > now - window]", "if t >= now - window]")],
        [("max(1, math.ceil(wait))", "max(1, int(wait))")],
    ],
}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


copies = _load(REPO / "scripts" / "make_student_copies.py", "make_student_copies")
lesson_copies = _load(REPO / "scripts" / "make_lesson_copies.py", "make_lesson_copies")


def _lesson_files() -> list[Path]:
    return sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def _sources() -> list[Path]:
    return lesson_copies.sources(LESSONS)


def _tagged(nb, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def _pairs(nb) -> list[tuple[str, str]]:
    """(exercise source, check source) of each exercise, in order."""
    return [(nb.cells[i].source, nb.cells[i + 1].source) for i in _tagged(nb, "exercise")]


# ---- the check helper --------------------------------------------------------------------------


def test_check_tells_not_done_passed_and_wrong_apart(capsys):
    with check(3, "写出 f"):
        raise NotImplementedError
    assert "练习 3 尚未完成 (not done yet)：写出 f" in capsys.readouterr().out
    with check(3, "写出 f"):
        pass
    assert "练习 3 通过" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="练习 3 未通过.*提示：x"):
        with check(3, "写出 f"):
            raise AssertionError("提示：x")
    with pytest.raises(AssertionError, match="练习 3 未通过.*ValueError"):
        with check(3, "写出 f"):
            int("x")  # the student's code crashing is a wrong answer too
    assert "通过" not in capsys.readouterr().out


# ---- the generator -----------------------------------------------------------------------------


def _source_nb() -> str:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1\nprint(x)", id="demo"),
            nbformat.v4.new_code_cell(
                f"def f():\n    {BEGIN}\n    return 2\n    {END}",
                id="ex",
                metadata={"tags": ["exercise"]},
            ),
            nbformat.v4.new_markdown_cell("## 思考题", id="q"),
        ]
    )
    return nbformat.writes(nb)


def _ran(text: str, outputs: dict[str, str]) -> str:
    """`text` as if run: each code cell gets an execution count, and the given stdout."""
    nb = nbformat.reads(text, as_version=4)
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=outputs[cell.id])]
    nb.metadata["language_info"] = {"name": "python"}
    return nbformat.writes(nb) + "\n"


def test_generator_strips_solutions_and_keeps_the_outputs_of_unchanged_cells(tmp_path):
    source = _source_nb()
    first = lesson_copies.student_lesson(source, None)
    assert BEGIN not in first and copies.CODE_STUB in first
    ran = _ran(first, {"demo": "1\n", "ex": ""})
    assert lesson_copies.student_lesson(source, ran) == ran  # in sync: nothing changes
    edited = source.replace("x = 1", "x = 3")
    again = nbformat.reads(lesson_copies.student_lesson(edited, ran), as_version=4)
    demo, ex = again.cells[0], again.cells[1]
    assert demo.outputs == [] and demo.execution_count is None  # its source changed
    assert ex.execution_count == 2  # untouched: keeps what the last run gave it
    assert again.metadata["language_info"] == {"name": "python"}


def test_check_mode_finds_every_kind_of_problem(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "00_a.ipynb").write_text(_source_nb())
    assert lesson_copies.main(["--check", "--lessons", str(tmp_path)], print_=lambda s: None) == 1
    messages: list[str] = []
    assert lesson_copies.main(["--lessons", str(tmp_path)], print_=messages.append) == 0
    assert "wrote lessons/00_a.ipynb" in messages
    problems = lesson_copies.find_problems(tmp_path, lesson_copies.expected_lessons(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("not run:")  # generated, never run
    copy = tmp_path / "00_a.ipynb"
    copy.write_text(_ran(copy.read_text(), {"demo": "1\n", "ex": ""}))
    assert lesson_copies.main(["--check", "--lessons", str(tmp_path)], print_=print) == 0
    copy.write_text(copy.read_text().replace("x = 1", "x = 2"))  # edited the copy, not the source
    source_with_outputs = _ran(_source_nb(), {"demo": "1\n", "ex": ""})
    (tmp_path / "source" / "00_a.ipynb").write_text(source_with_outputs)
    problems = lesson_copies.find_problems(tmp_path, lesson_copies.expected_lessons(tmp_path))
    assert [p.split(":")[0] for p in problems] == [
        "lessons/source/00_a.ipynb stores outputs",
        "out of date",
    ]


# ---- the tree ----------------------------------------------------------------------------------


def test_lessons_without_exercises_are_exactly_the_pending_ones():
    names = {p.name for p in _lesson_files()}
    lacking = {p.name for p in _lesson_files() if len(_tagged(nbformat.read(p, 4), "exercise")) < 2}
    assert lacking == PENDING & names, (
        f"lessons with fewer than 2 exercises: {sorted(lacking)}; PENDING lists {sorted(PENDING & names)}"
    )


def test_every_lesson_with_exercises_comes_from_a_source():
    with_exercises = {p.name for p in _lesson_files() if _tagged(nbformat.read(p, 4), "exercise")}
    assert with_exercises <= {p.name for p in _sources()}
    assert {p.name for p in _sources()} <= {p.name for p in _lesson_files()}


def test_student_copies_are_generated_and_were_run():
    problems = lesson_copies.find_problems(LESSONS, lesson_copies.expected_lessons(LESSONS))
    assert not problems, "\n".join(problems)


def test_release_leaves_the_sources_out():
    release = _load(REPO / "scripts" / "release.py", "release")
    assert not release.is_released("lessons/source/00_overview.ipynb")
    assert not release.is_released("scripts/make_lesson_copies.py")
    assert not release.is_released("tests/test_lesson_exercises.py")
    assert release.is_released("lessons/00_overview.ipynb")


def test_student_copies_hold_no_solution():
    leaks = [p.name for p in _lesson_files() if BEGIN in p.read_text() or END in p.read_text()]
    assert not leaks


def _defined_names(source: str) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _used_names(source: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_exercise_structure(path):
    nb = nbformat.read(path, as_version=4)
    exercises, checks = _tagged(nb, "exercise"), _tagged(nb, "exercise-check")
    assert len(exercises) >= 2
    assert checks == [i + 1 for i in exercises], "each exercise cell is followed by its check cell"
    heading = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "markdown"
        and any(line.startswith("## 练习") for line in c.source.splitlines())
    ]
    assert heading and heading[0] < exercises[0], "the exercises sit under a '## 练习' heading"
    defined: set[str] = set()
    for i in exercises:
        cell = nb.cells[i]
        lines = cell.source.splitlines()
        begins = [line for line in lines if BEGIN in line]
        assert begins, f"cell {i}: an exercise holds its solution in a {BEGIN!r} region"
        assert all(line.startswith(" ") for line in begins), (
            f"cell {i}: solution regions sit inside a function the student writes"
        )
        defined |= _defined_names(cell.source)
    later = [
        (i, c)
        for i, c in enumerate(nb.cells)
        if i > exercises[0] and c.cell_type == "code" and i not in exercises + checks
    ]
    for i, cell in later:
        assert not _used_names(cell.source) & defined, f"cell {i} uses an exercise's answer"


# ---- the checks, run ---------------------------------------------------------------------------

RUNNER = r"""
import contextlib, io, json, sys

results = {}
for label, cells in json.load(sys.stdin).items():
    namespace = {"__name__": "__main__"}
    ran = []
    for where, source in cells:
        out = io.StringIO()
        error = None
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"<{label}: {where}>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            error = [type(exc).__name__, str(exc)[:2000]]
        ran.append({"where": where, "stdout": out.getvalue(), "error": error})
    results[label] = ran
print("RESULTS " + json.dumps(results))
"""


def _jobs() -> dict[str, list[tuple[str, str]]]:
    """Per lesson and exercise: the solution, the student copy and a wrong answer, each run as
    exercise cell + check cell in a namespace of its own."""
    jobs = {}
    for source in _sources():
        solved = _pairs(nbformat.read(source, as_version=4))
        stubs = _pairs(nbformat.read(LESSONS / source.name, as_version=4))
        for k, ((exercise, checker), (stub, stub_checker)) in enumerate(
            zip(solved, stubs, strict=True), 1
        ):
            wrong = copies.strip_solutions(exercise, WRONG_ANSWER)
            jobs[f"{source.stem}/{k}/solution"] = [("exercise", exercise), ("check", checker)]
            jobs[f"{source.stem}/{k}/stub"] = [("exercise", stub), ("check", stub_checker)]
            jobs[f"{source.stem}/{k}/wrong"] = [("exercise", wrong), ("check", checker)]
            for n, edits in enumerate(PLAUSIBLY_WRONG.get(f"{source.stem}/{k}", [])):
                mistake = exercise
                for old, new in edits:
                    mistake = mistake.replace(old, new)
                jobs[f"{source.stem}/{k}/mistake{n}"] = [("exercise", mistake), ("check", checker)]
    return jobs


@pytest.fixture(scope="module")
def ran() -> dict[str, list[dict]]:
    """All exercise runs, in one child process (torch, numba and the simulator load once)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}  # lesson 05's kernels: the simulator
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(_jobs()),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1].removeprefix("RESULTS "))


def _exercise_ids() -> list[str]:
    return sorted({label.rsplit("/", 1)[0] for label in _jobs()})


def test_every_exercise_has_plausible_mistakes_that_apply():
    ids = _exercise_ids()
    assert sorted(PLAUSIBLY_WRONG) == ids, "list at least one plausible mistake per exercise"
    for source in _sources():
        for k, (exercise, _) in enumerate(_pairs(nbformat.read(source, as_version=4)), 1):
            for edits in PLAUSIBLY_WRONG[f"{source.stem}/{k}"]:
                text = exercise
                for old, new in edits:
                    assert old in text, f"{source.stem}/{k}: {old!r} is not in the solution"
                    text = text.replace(old, new)


def _mistakes() -> list[str]:
    return [
        f"{e}/mistake{n}" for e, edits in sorted(PLAUSIBLY_WRONG.items()) for n in range(len(edits))
    ]


@pytest.mark.parametrize("exercise", _exercise_ids())
def test_solution_passes_its_check(ran, exercise):
    cells = ran[f"{exercise}/solution"]
    assert [c["error"] for c in cells] == [None, None], cells
    number = exercise.rsplit("/", 1)[1]
    assert f"练习 {number} 通过" in cells[1]["stdout"], cells[1]["stdout"]


@pytest.mark.parametrize("exercise", _exercise_ids())
def test_stub_only_reports_not_done(ran, exercise):
    cells = ran[f"{exercise}/stub"]
    assert [c["error"] for c in cells] == [None, None], cells
    number = exercise.rsplit("/", 1)[1]
    assert f"练习 {number} 尚未完成 (not done yet)" in cells[1]["stdout"], cells[1]["stdout"]


@pytest.mark.parametrize("exercise", _exercise_ids())
def test_wrong_answer_fails_its_check_loudly(ran, exercise):
    cells = ran[f"{exercise}/wrong"]
    assert cells[0]["error"] is None, cells[0]
    number = exercise.rsplit("/", 1)[1]
    assert cells[1]["error"] is not None, "a wrong answer passed the check"
    kind, message = cells[1]["error"]
    assert kind == "AssertionError" and f"练习 {number} 未通过" in message, cells[1]["error"]


@pytest.mark.parametrize("mistake", _mistakes())
def test_plausible_mistake_fails_its_check(ran, mistake):
    cells = ran[mistake]
    number = mistake.split("/")[1]
    assert cells[1]["error"] is not None, f"{mistake} passed the check: {cells}"
    kind, message = cells[1]["error"]
    assert kind == "AssertionError" and f"练习 {number} 未通过" in message, cells[1]["error"]
