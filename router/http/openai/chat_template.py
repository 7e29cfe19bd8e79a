"""OpenAI chat messages -> one prompt string, through the model's Jinja chat template.

Rendered the way `transformers.apply_chat_template` renders: a sandboxed, immutable Jinja
environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `tojson`
filter that keeps non-ASCII text, and the `raise_exception` and `strftime_now` helpers. The
template sees `messages`, `bos_token`, `eos_token`, `add_generation_prompt` and, when given,
`tools`. Each template is compiled once per process.

Messages arrive validated (`router.http.openai.protocol.ChatMessage`, which flattens text parts);
everything the template itself does wrong raises `ChatTemplateError` (422 "template_error").
Choices:
- A final assistant message is continued: the prompt is cut right after its content (TGI and
  transformers' `continue_final_message`). An empty final assistant message just opens the
  assistant's turn.
- `{% generation %}` markers (transformers' assistant-mask extension) are removed, as TGI does.
"""

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.http.errors import TemplateError


class ChatTemplateError(TemplateError):
    """The model has no chat template, or rendering it failed (HTTP 422 `template_error`)."""


_GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once per process (raises jinja2.TemplateSyntaxError)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(_GENERATION_TAGS.sub("", source))


def _special_token(config: dict, name: str) -> str:
    token = config.get(name)
    if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else ""


def template_uses(source: str | None, variable: str) -> bool:
    """Whether a template mentions `variable` at all (e.g. `tools`)."""
    return source is not None and re.search(rf"\b{re.escape(variable)}\b", source) is not None


def render_chat(source: str | None, config: dict, messages: list[dict], tools: list | None = None) -> str:
    """The prompt for normalized `messages`: a generation prompt, or the final assistant message continued.

    `config` is the tokenizer configuration (for `bos_token` and `eos_token`).
    """
    if not source:
        raise ChatTemplateError("template not found")
    final = messages[-1]
    continuing = final["role"] == "assistant"
    if continuing and not final["content"].strip():
        messages, continuing = messages[:-1], False  # nothing to continue: open the assistant's turn
    variables = {
        "messages": messages,
        "bos_token": _special_token(config, "bos_token"),
        "eos_token": _special_token(config, "eos_token"),
        "add_generation_prompt": not continuing,
    }
    if tools is not None:
        variables["tools"] = tools
    try:
        rendered = compile_template(source).render(**variables)
    except Exception as e:  # the template is user data: any failure of it is a template error
        raise ChatTemplateError(str(e) or type(e).__name__) from None
    return _cut_after(rendered, final["content"]) if continuing else rendered


def _cut_after(rendered: str, content: str) -> str:
    """Cut the prompt right after the last occurrence of `content` (whitespace the template trimmed stays cut)."""
    stripped = content.strip()
    at = rendered.rfind(stripped)
    if at < 0:
        raise ChatTemplateError("the final assistant message does not appear in the rendered template")
    kept = content.lstrip()
    if rendered[at : at + len(kept)] == kept:
        return rendered[: at + len(kept)]
    return rendered[: at + len(stripped)]
