"""Modelfiles: parsing (Ollama's syntax, errors naming the line), Go templates, `minillm create`,
and a created model's SYSTEM / PARAMETER / TEMPLATE / MESSAGE applied by `run` and `serve`.

Expected prompts are built independently: by the model's own chat template on the
conversation the Modelfile stands for, or by plain string formatting for Go templates.
"""

from __future__ import annotations

import json

import httpx
import pytest

from minillm import LLM, SamplingParams
from minillm.cli import main, run_sampling_kwargs
from minillm.hub import list_models, remove, resolve, show
from minillm.hub.created import create_model, load_profile
from minillm.hub.gotemplate import GoChatTemplate, go_to_jinja, looks_like_go_template
from minillm.hub.modelfile import Modelfile, ModelfileError, parse_modelfile
from minillm.serve import build_app, run_in_thread
from minillm.testing import make_tiny_model

FULL = '''# a comment
from smollm2
SYSTEM """You are Mario.
Answer in one line."""
parameter temperature 0.5
PARAMETER top_k 20
PARAMETER stop "<|im_end|>"
PARAMETER stop "User:"
PARAMETER num_predict 42
PARAMETER seed 7
PARAMETER mirostat 0
MESSAGE user "Who are you?"
MESSAGE assistant """It's-a me,
Mario!"""
LICENSE """MIT"""
'''


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---------------------------------------------------------------------------- parsing
def test_parse_every_instruction():
    m = parse_modelfile(FULL)
    assert m.from_ == "smollm2"
    assert m.system == "You are Mario.\nAnswer in one line."
    assert m.parameters == {
        "temperature": 0.5,
        "top_k": 20,
        "stop": ["<|im_end|>", "User:"],
        "num_predict": 42,
        "seed": 7,
        "mirostat": 0,
    }
    assert m.messages == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "It's-a me,\nMario!"},
    ]
    assert m.license == ["MIT"]
    assert m.sampling_kwargs() == {
        "temperature": 0.5,
        "top_k": 20,
        "seed": 7,
        "max_tokens": 42,
        "stop": ["<|im_end|>", "User:"],
    }
    assert m.ignored_parameters == ["mirostat"]
    SamplingParams(**m.sampling_kwargs())  # every value is one SamplingParams accepts


def test_to_text_round_trips():
    m = parse_modelfile(FULL + 'TEMPLATE """{{ .System }} "quoted" {{ .Prompt }}"""\n')
    again = parse_modelfile(m.to_text())
    assert again == m


def test_quoted_strings_with_escapes_and_num_predict_infinite():
    m = parse_modelfile('FROM x\nSYSTEM "say \\"hi\\"\\nthen stop"\nPARAMETER num_predict -1\n')
    assert m.system == 'say "hi"\nthen stop'
    assert m.sampling_kwargs() == {"max_tokens": None}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("FROM x\nFORM y\n", 2, "unknown instruction 'FORM'"),
        ("FROM x\n\nPARAMETER temperature hot\n", 3, "temperature must be a number"),
        ("FROM x\nPARAMETER top_k 1.5\n", 2, "top_k must be an integer"),
        ("FROM x\nPARAMETER warp_speed 9\n", 2, "unknown parameter 'warp_speed'"),
        ("FROM x\nPARAMETER\n", 2, "PARAMETER needs a name"),
        ('FROM x\n# ok\nSYSTEM """never\nclosed\n', 3, "never closed"),
        ('FROM x\nSYSTEM "open\n', 2, "never closed"),
        ('FROM x\nSYSTEM """a""" trailing\n', 2, "after the closing"),
        ("FROM x\nMESSAGE robot hi\n", 2, "MESSAGE role must be one of"),
        ("FROM x\nFROM y\n", 2, "a second FROM (the first is on line 1)"),
        ("FROM x\nADAPTER ./lora.bin\n", 2, "ADAPTER"),
        ("FROM x\nSYSTEM\n", 2, "needs a value"),
        ('FROM x\nTEMPLATE "{{ if .System }}"\n', 2, "TEMPLATE is not valid"),
        ('FROM x\nTEMPLATE "{% for m in messages %}"\n', 2, "TEMPLATE is not valid"),
    ],
)
def test_errors_name_the_line(text, line, words):
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text, source="Modelfile")
    assert f"Modelfile line {line}:" in str(e.value) and words in str(e.value)


def test_missing_from_is_an_error():
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse_modelfile("SYSTEM hi\n")


# ---------------------------------------------------------------------------- templates
LEGACY = "{{ if .System }}<<SYS>>{{ .System }}<</SYS>>\n{{ end }}[INST] {{ .Prompt }} [/INST] {{ .Response }}</s>\n"


def test_legacy_go_template_renders_each_turn_and_stops_at_the_answer():
    t = GoChatTemplate(LEGACY)
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    expected = "<<SYS>>S<</SYS>>\n[INST] q1 [/INST] a1</s>\n" + "[INST] q2 [/INST] "
    assert t.render(msgs) == expected
    assert looks_like_go_template(LEGACY) and not looks_like_go_template("{% if x %}{% endif %}")


def test_messages_go_template_with_range_trim_and_functions():
    src = (
        '{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}U:{{ $m.Content }}'
        '{{- else if and (ne .Role "user") (eq .Role "system") }}S:{{ .Content }}'
        "{{- else }}A:{{ .Content }}{{ end }}|{{ end }}{{/* answer next */}}A:"
    )
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "bye"},
    ]
    assert GoChatTemplate(src).render(msgs) == "S:be nice|U:hi|A:yo|U:bye|A:"
    assert "{%- for" in go_to_jinja(src)


@pytest.mark.parametrize(
    "bad",
    [
        "{{ with .X }}{{ end }}",
        "{{ index .Messages 0 }}",
        "{{ end }}",
        "{{ if .X }}",
        "{{ $x := 1 }}",
        "{{ $y.Z }}",
    ],
)
def test_unsupported_go_templates_say_so(bad):
    with pytest.raises(ValueError):
        GoChatTemplate(bad)


# ---------------------------------------------------------------------------- create
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama", seed=13)


def write(tmp_path, text: str, name: str = "Modelfile"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_create_registers_resolves_inherits_and_removes(tmp_path, tiny_dir):
    base = write(
        tmp_path,
        f"FROM {tiny_dir}\nSYSTEM base system\nPARAMETER temperature 0.3\nPARAMETER top_k 5\n",
    )
    manifest, spec = create_model("base-bot", base)
    assert manifest.source == "modelfile" and manifest.path == str(tiny_dir)
    assert resolve("base-bot").path == tiny_dir
    assert "base-bot" in [m.name for m in list_models()]
    # a relative FROM is relative to the Modelfile; FROM a created model inherits from it
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub", "FROM base-bot\nPARAMETER temperature 0.9\n")
    _, child_spec = create_model("child-bot", child)
    assert child_spec.system == "base system"
    assert child_spec.parameters == {"temperature": 0.9, "top_k": 5}
    assert child_spec.from_ == spec.from_
    assert load_profile("child-bot") == child_spec
    info = show("child-bot")
    assert info["system"] == "base system" and info["modelfile"] == child_spec.to_text()
    remove("child-bot")
    assert load_profile("child-bot") is None
    with pytest.raises(LookupError):
        resolve("child-bot")


def test_create_errors(tmp_path, tiny_dir):
    with pytest.raises(LookupError, match="FROM 'no-such-model'"):
        create_model("x", write(tmp_path, "FROM no-such-model\n"))
    with pytest.raises(ValueError, match="bundled model"):
        create_model("smollm2", write(tmp_path, f"FROM {tiny_dir}\n"))
    with pytest.raises(ValueError, match="invalid model name"):
        create_model("../evil", write(tmp_path, f"FROM {tiny_dir}\n"))
    with pytest.raises(FileNotFoundError):
        create_model("x", tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("gemma3-270m", "gemma3-270m"),
        ("gemma3:270m", "gemma3-270m"),
        ("Gemma3", "gemma3-270m"),
        ("smollm2", "smollm2:135m"),
        ("smollm2:latest", "smollm2:135m"),
    ],
)
def test_create_refuses_a_bundled_models_name(tmp_path, tiny_dir, capsys, name, owner):
    """A created model named like a bundled one would hide it: refused, nothing registered."""
    with pytest.raises(ValueError, match=f"{name!r} is a name of the bundled model {owner}"):
        create_model(name, write(tmp_path, f"FROM {tiny_dir}\n"))
    assert main(["create", name, "-f", str(write(tmp_path, f"FROM {tiny_dir}\n"))]) == 1
    assert f"bundled model {owner}" in capsys.readouterr().err
    assert load_profile(name) is None


def test_cli_create_show_and_errors(tmp_path, tiny_dir, capsys):
    good = write(
        tmp_path,
        f"FROM {tiny_dir}\nSYSTEM Be Mario.\nPARAMETER num_ctx 128\nPARAMETER num_thread 2\n",
    )
    assert main(["create", "mario", "-f", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("success") and "num_thread" in out
    assert main(["show", "mario", "--system"]) == 0
    assert capsys.readouterr().out.strip() == "Be Mario."
    assert main(["show", "mario", "--modelfile"]) == 0
    assert parse_modelfile(capsys.readouterr().out).system == "Be Mario."
    assert main(["show", "mario", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modelfile_parameters"]["num_ctx"] == 128
    bad = write(tmp_path, "FROM smollm2\nPARAMETER temperature warm\n", "Bad")
    assert main(["create", "bad", "-f", str(bad)]) == 1
    assert "line 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run and serve
def test_run_sampling_kwargs_layers_defaults_modelfile_and_flags():
    class Args:
        temperature, top_p, top_k, max_tokens, seed = None, None, 3, None, None

    profile = Modelfile("x", parameters={"temperature": 0.1, "top_k": 9, "num_predict": 7})
    assert run_sampling_kwargs(Args(), profile) == {
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 3,
        "max_tokens": 7,
    }


def test_run_uses_the_modelfile(tmp_path, tiny_dir, capsys, monkeypatch):
    write(
        tmp_path,
        f"FROM {tiny_dir}\nSYSTEM Talk like a pirate.\nPARAMETER temperature 0\n"
        f"PARAMETER num_predict 5\nMESSAGE user Ahoy?\nMESSAGE assistant Arr!\n",
    )
    assert main(["create", "pirate", "-f", str(tmp_path / "Modelfile")]) == 0
    capsys.readouterr()
    conversation = [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Ahoy?"},
        {"role": "assistant", "content": "Arr!"},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    ref = LLM(str(tiny_dir), backend="ref")
    expected = ref.chat(conversation, SamplingParams(temperature=0, max_tokens=5))[0]
    assert main(["run", "pirate", "Where is the treasure?", "--backend", "ref"]) == 0
    assert capsys.readouterr().out.startswith(expected.outputs[0].text + "\n\n")


def test_server_applies_system_parameters_and_go_template(tmp_path, tiny_dir, free_port):
    template = "{{ if .System }}[S]{{ .System }}\n{{ end }}[U]{{ .Prompt }}\n[A]{{ .Response }}\n"
    write(
        tmp_path,
        f'FROM {tiny_dir}\nSYSTEM Be brief.\nTEMPLATE """{template}"""\n'
        f"PARAMETER temperature 0\nPARAMETER num_predict 6\n",
    )
    _, spec = create_model("brief", tmp_path / "Modelfile")
    llm = LLM("brief", backend="ref", block_size=4, kv_cache_memory="4MiB")
    ref = LLM(str(tiny_dir), backend="ref", block_size=4, kv_cache_memory="4MiB")
    prompt = "[S]Be brief.\n[U]Hello there\n[A]"
    expected = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=6))[0]
    own_system = ref.generate(  # Ollama's default repeat_penalty applies on /api/chat
        "[S]Shout.\n[U]Hello there\n[A]",
        SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.1),
    )[0]
    app = build_app(llm, served_model_name="brief", profile=spec)
    with run_in_thread(app, port=free_port()) as srv:
        chat = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "brief", "messages": [{"role": "user", "content": "Hello there"}]},
        ).json()
        ollama = httpx.post(
            srv.url + "/api/chat",
            json={
                "model": "brief",
                "stream": False,
                "messages": [
                    {"role": "system", "content": "Shout."},
                    {"role": "user", "content": "Hello there"},
                ],
            },
        ).json()
        shown = httpx.post(srv.url + "/api/show", json={"model": "brief"}).json()
    assert chat["usage"]["prompt_tokens"] == len(ref.tokenizer.encode(prompt))
    assert chat["choices"][0]["message"]["content"] == expected.outputs[0].text
    assert chat["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)
    # a request's own system message wins over the Modelfile's (as in Ollama)
    assert ollama["message"]["content"] == own_system.outputs[0].text
    assert shown["system"] == "Be brief." and shown["template"] == template
    assert "temperature" in shown["parameters"] and shown["details"]["parent_model"]
