"""ChatTemplate: golden SmolLM2 prompts, parity with transformers' apply_chat_template, errors."""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from talkloop.engine.assets import default_model_path
from talkloop.engine.chat_template import CHATML_TEMPLATE, ChatMessage, ChatTemplate
from talkloop.engine.errors import InvalidRequestError, ModelLoadError
from talkloop.engine.tokenizer import Tokenizer

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Exercises what HF's environment adds: trim/lstrip blocks, loop controls, namespace, tojson
# without HTML escaping, strftime_now, the {% generation %} tag, bos/eos and extra variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] %}
        {%- continue %}
    {%- endif %}
<|{{ message['role'] }}|>
    {% if message['role'] == 'assistant' %}
        {%- generation %}{{ message['content'] | trim }}{% endgeneration %}
    {%- else %}
        {{- message['content'] }}
    {%- endif %}
{{ eos_token }}
{% endfor %}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{% if ns.system %}System: {{ ns.system }}
{% endif %}
Year {{ strftime_now('%Y') }}
{% if enable_thinking is defined %}thinking={{ enable_thinking }}
{% endif %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
)

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are Ada, a <b>bold</b> & 'witty' pirate."},
        {"role": "user", "content": "Ahoy! 👋🏽 日本語?"},
        {"role": "assistant", "content": "  Arr, matey.  "},
        {"role": "user", "content": "Tell me a joke\nwith two lines"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & 'later'",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "default": None}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def template(smollm: Tokenizer) -> ChatTemplate:
    return ChatTemplate.for_tokenizer(smollm)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """transformers' tokenizer over the same tokenizer.json, for apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    folder: Path = tmp_path_factory.mktemp("smollm_tokenizer")
    smollm.save(folder)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=smollm.bos_token,
        eos_token=smollm.eos_token,
    )


# ------------------------------------------------ golden SmolLM2 prompts


def test_smollm_inserts_default_system_prompt(template: ChatTemplate) -> None:
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm_system_user_assistant(template: ChatTemplate) -> None:
    messages = [
        ChatMessage("system", "You are Ada."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Bye"),
    ]
    expected = (
        "<|im_start|>system\nYou are Ada.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert template.render(messages, add_generation_prompt=False) == expected
    assert template.render(messages) == expected + "<|im_start|>assistant\n"


def test_dataclass_and_dict_messages_render_alike(template: ChatTemplate) -> None:
    as_dicts = [{"role": "user", "content": "Hi", "name": None}]
    assert template.render([ChatMessage("user", "Hi")]) == template.render(as_dicts)


def test_continue_final_message_leaves_the_turn_open(template: ChatTemplate) -> None:
    messages = [ChatMessage("user", "Story?"), ChatMessage("assistant", "Once upon a")]
    text = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>user\nStory?<|im_end|>\n<|im_start|>assistant\nOnce upon a")


def test_rendered_prompt_tokenizes_with_single_special_ids(
    smollm: Tokenizer, template: ChatTemplate
) -> None:
    prompt = template.render([ChatMessage("user", "Hi")])
    ids = smollm.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert smollm.decode(ids) == prompt


# ------------------------------------------------ parity with transformers


@pytest.mark.parametrize("source_name", ["smollm", "chatml", "feature"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one_turn", "multi_turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_parity_with_transformers_apply_chat_template(
    smollm: Tokenizer,
    hf_tokenizer: Any,
    source_name: str,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    with_tools: bool,
) -> None:
    source = {"smollm": smollm.chat_template, "chatml": CHATML_TEMPLATE}.get(
        source_name, FEATURE_TEMPLATE
    )
    assert source is not None
    tools = TOOLS if with_tools else None
    expected = hf_tokenizer.apply_chat_template(
        conversation,
        chat_template=source,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        enable_thinking=False,
    )
    ours = ChatTemplate(source, bos_token=smollm.bos_token, eos_token=smollm.eos_token)
    rendered = ours.render(
        conversation,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        enable_thinking=False,
    )
    assert rendered == expected


def test_feature_template_output() -> None:
    ours = ChatTemplate(FEATURE_TEMPLATE, bos_token="<s>", eos_token="</s>")
    rendered = ours.render(CONVERSATIONS[1][:3])
    year = datetime.now().strftime("%Y")
    assert rendered == (
        "<s><|user|>\nAhoy! 👋🏽 日本語?</s>\n<|assistant|>\nArr, matey.</s>\n"
        "System: You are Ada, a <b>bold</b> & 'witty' pirate.\n"
        f"Year {year}\n<|assistant|>\n"
    )


def test_tojson_keeps_html_characters() -> None:
    rendered = ChatTemplate("{{ tools | tojson }}").render([], tools=TOOLS)
    assert "\"Weather <now> & 'later'\"" in rendered
    assert '"default": null' in rendered


def test_continue_final_message_matches_transformers(smollm: Tokenizer, hf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Story?"}, {"role": "assistant", "content": "Once"}]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=smollm.chat_template, continue_final_message=True, tokenize=False
    )
    ours = ChatTemplate.for_tokenizer(smollm)
    assert ours.render(messages, add_generation_prompt=False, continue_final_message=True) == (
        expected
    )


def test_strict_template_matches_transformers(hf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=STRICT_TEMPLATE, tokenize=False
    )
    assert ChatTemplate(STRICT_TEMPLATE).render(messages) == expected


# ------------------------------------------------ choosing a template


def test_model_without_template_gets_chatml(smollm: Tokenizer) -> None:
    bare = dataclasses.replace(smollm, chat_templates={})
    assert ChatTemplate.for_tokenizer(bare).source == CHATML_TEMPLATE
    rendered = ChatTemplate.for_tokenizer(bare).render([ChatMessage("user", "Hi")])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_named_template_is_chosen(smollm: Tokenizer) -> None:
    named = dataclasses.replace(smollm, chat_templates={"default": "A", "tool_use": "B"})
    assert ChatTemplate.for_tokenizer(named, "tool_use").render([]) == "B"
    with pytest.raises(
        InvalidRequestError, match=r"no chat template named 'rag'.*default, tool_use"
    ):
        ChatTemplate.for_tokenizer(named, "rag")


# ------------------------------------------------ errors


def test_invalid_jinja_names_the_line() -> None:
    with pytest.raises(ModelLoadError, match="chat template is not valid Jinja: line 2"):
        ChatTemplate("ok\n{% for x in %}{% endfor %}")


def test_raise_exception_surfaces_the_templates_message() -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate") as caught:
        ChatTemplate(STRICT_TEMPLATE).render([ChatMessage("assistant", "first")])
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"content": "no role"}], r"messages\[0\] must have a string 'role'"),
        (["just a string"], r"messages\[0\] must have a string 'role'"),
        ([{"role": "user", "content": object()}], r"messages\[0\]\.content is a object"),
    ],
)
def test_bad_messages_are_named(template: ChatTemplate, messages: list[Any], problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem):
        template.render(messages)


def test_template_type_errors_are_request_errors(template: ChatTemplate) -> None:
    # SmolLM's template concatenates content as a string; a list of parts cannot be.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidRequestError, match="chat template failed on these messages"):
        template.render(parts)


def test_enum_values_reach_the_template_as_plain_values() -> None:
    class Role(str, enum.Enum):  # noqa: UP042 (str() of this mixin is "Role.USER", not "user")
        USER = "user"

    class Level(enum.IntEnum):
        HIGH = 3

    source = "{{ messages[0]['role'] }} {{ level + 1 }}"
    messages = [{"role": Role.USER, "content": "x"}]
    assert ChatTemplate(source).render(messages, level=Level.HIGH) == "user 4"


def test_none_fields_are_dropped_before_rendering() -> None:
    source = "{% for m in messages %}{{ 'content' in m }}{% endfor %}"
    rendered = ChatTemplate(source).render([{"role": "assistant", "content": None}])
    assert rendered == "False"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(source: str) -> None:
    with pytest.raises(InvalidRequestError, match="SecurityError"):
        ChatTemplate(source).render([ChatMessage("user", "x")])


def test_continue_final_message_needs_an_open_turn(template: ChatTemplate) -> None:
    messages = [ChatMessage("user", "Hi")]
    with pytest.raises(InvalidRequestError, match="add_generation_prompt=False"):
        template.render(messages, continue_final_message=True)
    with pytest.raises(InvalidRequestError, match="needs a last message"):
        template.render([], add_generation_prompt=False, continue_final_message=True)
    dropping = ChatTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(InvalidRequestError, match="drops the final message"):
        dropping.render(messages, add_generation_prompt=False, continue_final_message=True)
