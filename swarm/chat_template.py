"""Chat messages -> prompt text, through the model's Jinja chat template.

Owns validating chat messages and rendering them with the GGUF's
`tokenizer.chat_template` the way Hugging Face transformers does
(`apply_chat_template`): a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
text, loop controls, and the `{% generation %}` block tag.

A GGUF without a template gets its family's turn format, chosen by
`general.architecture`:

| architecture | fallback |
|---|---|
| `gemma*` (gemma, gemma2, gemma3, ...) | Gemma 3's template: `<start_of_turn>user\\n...<end_of_turn>\\n`, assistant turns as `model`, a system message folded into the first user turn, ending with `<start_of_turn>model\\n`; the same text as llama.cpp's built-in `gemma` format |
| anything else (llama, mistral, ...) | ChatML: `<|im_start|>role\\n...<|im_end|>\\n`, ending with `<|im_start|>assistant\\n` (llama.cpp's own default for template-less models) |

BOS: templates often begin with `{{ bos_token }}` while the tokenizer also adds
BOS for models whose rule is add_bos. Like llama.cpp (common/chat.cpp: "To avoid
double BOS / EOS tokens, we're manually removing beginning / trailing tokens"),
`render` removes one leading BOS text when the model adds BOS itself, so the
caller always tokenizes the result with `Tokenizer.encode(text)` (the model's
add_bos rule, parse_special on) and gets exactly one BOS.

Content given as a list of parts (OpenAI style) is joined into one string, text
parts separated by newlines; other part types are refused.

Imports jinja2 and `swarm.tokenizer` (for the model's BOS rule); never jax.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from swarm.errors import InvalidRequestError, UnsupportedModelError
from swarm.tokenizer import model_adds_bos, special_token_ids

ROLES = frozenset({"system", "user", "assistant", "tool"})

# Gemma 3's published chat template, reduced to string content (render joins
# content parts first).
GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- (message['content'] or '') | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

CHATML_TEMPLATE = r"""{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


class ChatTemplate:
    """A compiled chat template plus the token texts it is rendered with."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        strip_bos: bool = False,
        fallback: str | None = None,
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.strip_bos = strip_bos
        self.fallback = fallback  # None for the GGUF's own template, else "gemma" or "chatml"
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise UnsupportedModelError(
                f"chat template does not parse (line {error.lineno}): {error.message}"
            ) from None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ChatTemplate:
        """The GGUF's template, or its family's fallback (see the module table)."""
        tokens = metadata.get("tokenizer.ggml.tokens") or ()
        bos_id, eos_id = special_token_ids(metadata)
        bos_token = tokens[bos_id] if bos_id is not None else ""
        eos_token = tokens[eos_id] if eos_id is not None else ""
        source = metadata.get("tokenizer.chat_template")
        fallback = None
        if not source:
            architecture = str(metadata.get("general.architecture", ""))
            fallback = "gemma" if architecture.startswith("gemma") else "chatml"
            source = GEMMA_TEMPLATE if fallback == "gemma" else CHATML_TEMPLATE
        return cls(
            source,
            bos_token=bos_token,
            eos_token=eos_token,
            strip_bos=model_adds_bos(metadata),
            fallback=fallback,
        )

    @property
    def from_gguf(self) -> bool:
        """True when rendering with the file's own template, not a fallback."""
        return self.fallback is None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Prompt text for `messages`; raises InvalidRequestError for bad messages."""
        context: dict[str, Any] = {
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools is not None:
            context["tools"] = [dict(tool) for tool in tools]
        try:
            text = self._template.render(**context)
        except jinja2.TemplateError as error:
            raise InvalidRequestError(f"chat template rejected the messages: {error}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise InvalidRequestError(f"chat template failed on these messages: {error}") from None
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        return text


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of `messages` with string content, as templates expect."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"message {index} is not an object")
        role = message.get("role")
        if role is None:
            raise InvalidRequestError(f"message {index} has no role")
        if role not in ROLES:
            raise InvalidRequestError(f"message {index} has unknown role {role!r}")
        copy = dict(message)
        if "content" not in message and not (role == "assistant" and message.get("tool_calls")):
            raise InvalidRequestError(f"message {index} has no content")
        copy["content"] = _content_text(message.get("content"), index, role, message)
        normalized.append(copy)
    return normalized


def _content_text(content: Any, index: int, role: str, message: Mapping[str, Any]) -> str | None:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            return None
        raise InvalidRequestError(f"message {index} has no content")
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidRequestError(f"message {index}: only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"message {index}: a text part has no text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(f"message {index} content must be a string or a list of parts")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers'
    AssistantTracker, without the mask bookkeeping nobody here uses)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson, which HTML-escapes and forces ASCII
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment
