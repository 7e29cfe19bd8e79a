"""The request's tools: `Function` and `ToolPlan`, `plan()`, which checks the tools against each
other and `tool_choice`, and the rendering of tools and past calls for the chat template
(`prompt()` for a template without tool support, `messages_for_template()`)."""

import contextlib
import json
from dataclasses import dataclass, field

from router.http import grammar
from router.http.errors import OpenAIError
from router.http.openai.tools.formats import CallFormat

ANY_OBJECT = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Function:
    """A tool of the request (its `function`)."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: dict(ANY_OBJECT))
    strict: bool | None = None

    def openai(self) -> dict:
        """The tool as OpenAI writes it (what templates with tool support expect)."""
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools in effect for a request (`tool_choice` not "none", some tools)."""

    format: CallFormat
    functions: tuple[Function, ...]  # those the output may call
    offered: tuple[Function, ...]  # those shown to the model
    forced: bool  # `required` or a named function: the output is calls only
    parallel: bool


def _tool_error(message: str) -> OpenAIError:
    return OpenAIError(f"Tool error: {message}", "tool_error")


def plan(
    functions: list[Function],
    choice: str | None,
    named: str | None,
    parallel: bool,
    fmt: CallFormat,
    response_format_constrained: bool,
) -> ToolPlan | None:
    """Check the tools against each other and `tool_choice` ("none", "auto", "required", or
    "function" with the function `named`); None when no tool may be called. Raises a `tool_error`."""
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise _tool_error(f"two tools are named `{name}`")
    for f in functions:
        _check_parameters(f)
    if choice == "none" or (choice in (None, "auto") and not functions):
        return None
    if not functions:
        wanted = '"required"' if choice == "required" else f"(the function `{named}`)"
        raise _tool_error(f"`tool_choice` {wanted} needs `tools`")
    if response_format_constrained:
        raise _tool_error(
            "`response_format` cannot constrain the output while tools may be called: "
            'set `tool_choice` to "none", or `response_format` to `text`'
        )
    callable_ = functions
    if choice == "function":
        callable_ = [f for f in functions if f.name == named]
        if not callable_:
            raise _tool_error(f"`tool_choice` names the function `{named}`, which is not in `tools`")
    forced = choice in ("required", "function")
    return ToolPlan(fmt, tuple(callable_), tuple(functions), forced=forced, parallel=parallel)


def _check_parameters(f: Function) -> None:
    try:
        grammar.json_schema(f.parameters)
    except ValueError as e:
        raise _tool_error(f"the parameters of `{f.name}`: {e}") from None
    kind = f.parameters.get("type")
    if kind is not None and kind != "object":
        raise _tool_error(f"the parameters of `{f.name}` must describe a JSON object. Given type: {kind!r}")


# ---------------------------------------------------------------------------------------------
# Rendering


def prompt(tools: ToolPlan) -> str:
    """The system prompt for a template without tool support: the tools, and how to call them."""
    example = tools.format.render([("<function-name>", "<arguments-json-object>")], quote_names=False)
    if tools.forced and len(tools.functions) == 1:
        duty = f"You must call the function `{tools.functions[0].name}`."
    elif tools.forced:
        duty = "You must call at least one function." if tools.parallel else "You must call one function."
    else:
        duty = "You may call one or more functions" if tools.parallel else "You may call one function"
        duty += " to assist with the user query, or answer directly."
    return "\n".join(
        [
            "# Tools",
            "",
            duty,
            "",
            "The function signatures are within <tools></tools> XML tags:",
            "<tools>",
            *(json.dumps(f.openai(), ensure_ascii=False) for f in tools.offered),
            "</tools>",
            "",
            "To call a function, answer with the function name and arguments as a JSON object, exactly in this format:",
            example,
        ]
    )


def messages_for_template(
    messages: list[dict], tools: ToolPlan | None, fmt: CallFormat, template_has_tools: bool
) -> list[dict]:
    """The messages as the chat template sees them.

    A template with tool support gets them as they are, but for a call's `arguments`, given as
    JSON text by OpenAI clients, which it gets as an object (templates write it with `tojson`, as
    transformers and vLLM pass it). Otherwise tools are described in the first system message,
    an assistant's `tool_calls` are written into its content in the family's format, and `tool`
    results become user messages of `<tool_response>` blocks (consecutive ones in one message).
    """
    if template_has_tools:
        return [_decoded_arguments(m) for m in messages]
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            calls = fmt.render(
                (c["function"]["name"], _arguments_text(c["function"]["arguments"])) for c in m["tool_calls"]
            )
            content = f"{m['content']}\n{calls}" if m["content"] else calls
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": content})
        else:
            out.append(m)
    if tools is not None:
        if out[0]["role"] == "system":
            out[0] = {
                **out[0],
                "content": f"{out[0]['content']}\n\n{prompt(tools)}" if out[0]["content"] else prompt(tools),
            }
        else:
            out.insert(0, {"role": "system", "content": prompt(tools)})
    return out


def _arguments_text(arguments: str | dict) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _decoded_arguments(message: dict) -> dict:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):  # not JSON: left as the client wrote it
                arguments = json.loads(arguments)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}
