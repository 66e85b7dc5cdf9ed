"""Chat messages -> prompt text through the model's Jinja chat template, as Hugging Face renders it.

The template runs in Jinja's immutable sandbox with HF's globals (`raise_exception`,
`strftime_now`, a non-escaping `tojson`). A model without a template gets ChatML. This module
does not tokenize: the rendered text already spells BOS and turn markers, so encode it with
`add_special_tokens=False` unless the model's tokenizer says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from talkloop.engine.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from talkloop.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The ChatML template HF used as its default; the format SmolLM2, Qwen and Hermes models share.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Appended to the final message to find where its content ends in the rendered text.
_CONTINUE_TAG = "\x00CONTINUE_FINAL_MESSAGE\x00"

# Exceptions a template can raise while rendering given messages (its own raise_exception too).
_RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
)


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; templates may also read `name`, `tool_calls`, `reasoning_content` etc.,
    which plain dict messages can carry."""

    role: str
    content: str
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = {"role": self.role, "content": self.content, "name": self.name}
        return {key: value for key, value in fields.items() if value is not None}


Message = ChatMessage | Mapping[str, Any]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag) renders its body as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension declares it a plain class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # NOTE: Jinja's own tojson HTML-escapes <, >, &, ' — wrong inside a prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(
            f"chat template is not valid Jinja: line {exc.lineno}: {exc.message}"
        ) from exc


def _plain(value: Any, where: str) -> Any:
    """JSON-like data only: the sandboxed template never sees methods of caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) would bring their methods into the sandbox.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int | float):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    raise InvalidRequestError(
        f"{where} is a {type(value).__name__}; chat templates take JSON-like values "
        "(str, number, bool, list, dict)",
        param="messages",
    )


def _render_error_message(exc: Exception) -> str:
    if type(exc) is jinja2.TemplateError:  # the template's own raise_exception(...)
        return f"chat template rejected the messages: {exc}"
    return f"chat template failed on these messages: {type(exc).__name__}: {exc}"


def _message_dict(message: Message, index: int) -> dict[str, Any]:
    raw = message.to_dict() if isinstance(message, ChatMessage) else message
    if not isinstance(raw, Mapping) or not isinstance(raw.get("role"), str):
        raise InvalidRequestError(
            f"messages[{index}] must have a string 'role' (got {message!r})", param="messages"
        )
    # NOTE: OpenAI clients send `content: null` beside tool calls; templates test for absence.
    return {k: _plain(v, f"messages[{index}].{k}") for k, v in raw.items() if v is not None}


@dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A compiled chat template plus the special-token strings it may print."""

    source: str = CHATML_TEMPLATE
    bos_token: str | None = None
    eos_token: str | None = None
    _compiled: jinja2.Template = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _compile(self.source))

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, name: str = "default") -> ChatTemplate:
        """The tokenizer's template called `name` ("default": its main one), else ChatML."""
        source = tokenizer.chat_templates.get(name)
        if source is None and name != "default":
            known = ", ".join(sorted(tokenizer.chat_templates)) or "none"
            raise InvalidRequestError(
                f"model has no chat template named {name!r}; it has: {known}", param="chat_template"
            )
        if source is None:
            logger.info("model ships no chat template; using ChatML")
            source = CHATML_TEMPLATE
        return cls(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`.

        `add_generation_prompt` opens the assistant's turn; `continue_final_message` instead
        leaves the last message open so generation continues it (an assistant prefill).
        `tools` (JSON schemas) and `extra` (e.g. `enable_thinking`, `documents`) are template
        variables, as in HF's `apply_chat_template`.
        """
        chat = [_message_dict(message, i) for i, message in enumerate(messages)]
        if continue_final_message:
            return self._render_continuation(chat, add_generation_prompt, tools, extra)
        return self._render(chat, add_generation_prompt, tools, extra)

    def _render(
        self,
        chat: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        extra: Mapping[str, Any],
    ) -> str:
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables |= _plain(extra, "chat template variable")
        try:
            return self._compiled.render(
                messages=chat,
                tools=None if tools is None else _plain(tools, "tools"),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _RENDER_ERRORS as exc:
            raise InvalidRequestError(_render_error_message(exc), param="messages") from exc

    def _render_continuation(
        self,
        chat: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        extra: Mapping[str, Any],
    ) -> str:
        """Render with a tag after the final message's content, then cut the text at the tag."""
        if add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message continues the last message; it cannot also open a new "
                "turn (set add_generation_prompt=False)",
                param="continue_final_message",
            )
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise InvalidRequestError(
                "continue_final_message needs a last message with string content",
                param="messages",
            )
        chat[-1]["content"] += _CONTINUE_TAG
        text = self._render(chat, False, tools, extra)
        if _CONTINUE_TAG not in text:
            raise InvalidRequestError(
                "chat template drops the final message's content; it cannot be continued",
                param="continue_final_message",
            )
        return text[: text.rindex(_CONTINUE_TAG)]
