"""minillm.chat against transformers' apply_chat_template on the same templates.

The bundled SmolLM2 template comes from the GGUF; the extra templates below are written here
to exercise the Jinja features real templates use (whitespace control, namespace, loop
controls, tojson, raise_exception, strftime_now, {% generation %}).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minillm.chat import (
    FALLBACK_CHATML_TEMPLATE,
    ChatTemplate,
    apply_chat_template,
    validate_messages,
)
from minillm.formats.gguf import read_metadata
from minillm.tokenizer import Tokenizer

CONVERSATIONS = {
    "single user": [{"role": "user", "content": "Hi!"}],
    "with system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is a KV cache?"},
    ],
    "multi turn": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "11"},
        {"role": "user", "content": "And one more, please."},
    ],
    "chinese": [
        {"role": "system", "content": "你是一位耐心的老师。"},
        {"role": "user", "content": "什么是张量并行（Tensor Parallelism）？"},
        {"role": "assistant", "content": "把一个矩阵切到多张卡上计算。"},
        {"role": "user", "content": "举个例子 😀"},
    ],
    "whitespace and code": [
        {"role": "user", "content": "  fix this:\n\tdef f(x):\n\t\treturn x  \n"},
        {"role": "assistant", "content": "```python\ndef f(x):\n    return x\n```"},
    ],
    "empty content": [{"role": "user", "content": ""}],
}

# Written for these tests: a Llama-3-like and a Qwen-like template using the usual features.
HEADER_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(turns=0) %}
{%- if messages[0]['role'] == 'system' %}
<|start|>system<|sep|>{{ messages[0]['content'] | trim }}<|end|>
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
<|start|>{{ message['role'] }}<|sep|>
    {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {%- else %}{{ message['content'] | trim }}{% endif %}<|end|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start|>assistant<|sep|>
{%- endif %}
{{- '' if ns.turns > 0 else raise_exception('no user or assistant turn') }}"""

TOOLS_TEMPLATE = """{% if tools %}<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
{% endif %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('role ' ~ message.role ~ ' is not supported') }}
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气 <today> & tomorrow",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer(bundled_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(bundled_gguf_path))


@pytest.fixture(scope="module")
def hf(bundled_gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(bundled_gguf_path.parent), gguf_file=bundled_gguf_path.name
    )


def _hf_render(hf, messages, add_generation_prompt, **kwargs) -> str:
    return hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


# ---------------------------------------------------------------------- the model's template
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_bundled_template_matches_transformers(tokenizer, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert ours == _hf_render(hf, messages, add_generation_prompt)


def test_chat_template_object_matches_apply_chat_template(tokenizer):
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    assert not template.is_fallback
    for messages in CONVERSATIONS.values():
        assert template.render(messages) == apply_chat_template(tokenizer, messages)


def test_rendered_prompt_tokenizes_like_transformers(tokenizer, hf):
    messages = CONVERSATIONS["chinese"]
    text = apply_chat_template(tokenizer, messages)
    assert tokenizer.encode(text) == hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


# ---------------------------------------------------------------------- Jinja features
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["with system", "multi turn", "chinese", "whitespace and code"])
def test_header_template_matches_transformers(tokenizer, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(HEADER_TEMPLATE, bos_token=tokenizer.bos_token).render(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert ours == _hf_render(hf, messages, add_generation_prompt, chat_template=HEADER_TEMPLATE)


def test_tools_template_with_tojson_matches_transformers(hf):
    messages = CONVERSATIONS["with system"]
    ours = ChatTemplate(TOOLS_TEMPLATE).render(messages, tools=TOOLS)
    expected = _hf_render(hf, messages, True, chat_template=TOOLS_TEMPLATE, tools=TOOLS)
    assert ours == expected
    assert "天气 <today> & tomorrow" in ours  # no ASCII or HTML escaping


def test_raise_exception_becomes_a_value_error(hf):
    import jinja2

    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="role tool is not supported"):
        _hf_render(hf, messages, True, chat_template=TOOLS_TEMPLATE)
    with pytest.raises(ValueError, match="role tool is not supported"):
        ChatTemplate(TOOLS_TEMPLATE).render(messages)


def test_strftime_now_matches_transformers(hf):
    template = "{{ strftime_now('%Y-%m') }}|{{ messages | length }}"
    messages = CONVERSATIONS["single user"]
    assert ChatTemplate(template).render(messages) == _hf_render(
        hf, messages, True, chat_template=template
    )


def test_template_is_sandboxed():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate(template).render(CONVERSATIONS["single user"])


def test_syntax_error_is_a_value_error():
    with pytest.raises(ValueError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")


# ---------------------------------------------------------------------- fallback
def test_fallback_is_chatml_only_when_the_model_has_none(tokenizer):
    template = ChatTemplate("")
    assert template.is_fallback and template.source == FALLBACK_CHATML_TEMPLATE
    assert template.render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = Tokenizer(tokenizer.backend, bos_token=None, eos_token="<|im_end|>", chat_template=None)
    assert apply_chat_template(bare, [{"role": "user", "content": "hi"}]) == template.render(
        [{"role": "user", "content": "hi"}]
    )
    assert ChatTemplate(tokenizer.chat_template).render(CONVERSATIONS["single user"]) != (
        template.render(CONVERSATIONS["single user"])
    )  # SmolLM2 adds its default system prompt: its own template is used


# ---------------------------------------------------------------------- message validation
def test_text_parts_are_flattened(tokenizer, hf):
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    flat = [{"role": "user", "content": "first\nsecond"}]
    assert apply_chat_template(tokenizer, parts) == _hf_render(hf, flat, True)
    assert validate_messages(parts) == flat
    assert parts[0]["content"][0] == {"type": "text", "text": "first"}  # caller's data untouched


def test_assistant_tool_call_may_have_no_content():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "w"}}]},
    ]
    assert validate_messages(messages)[1]["content"] is None


@pytest.mark.parametrize(
    ("messages", "error", "words"),
    [
        ("hello", TypeError, "list"),
        ({"role": "user", "content": "hi"}, TypeError, "list"),
        ([], ValueError, "empty"),
        (["hi"], TypeError, r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], ValueError, r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], ValueError, "no 'content'"),
        ([{"role": "robot", "content": "hi"}], ValueError, "unknown role 'robot'"),
        ([{"role": "user", "content": 42}], TypeError, "content must be a str"),
        ([{"role": "user", "content": None}], TypeError, "content must be a str"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            TypeError,
            "'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], TypeError, "text must"),
        (
            [{"role": "user", "content": "ok"}, {"role": "assistant", "content": 3.5}],
            TypeError,
            r"messages\[1\]",
        ),
    ],
)
def test_bad_messages_are_rejected_with_a_clear_error(tokenizer, messages, error, words):
    with pytest.raises(error, match=words):
        validate_messages(messages)
    with pytest.raises(error, match=words):
        apply_chat_template(tokenizer, messages)
