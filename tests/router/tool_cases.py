"""Tools, chat templates (one per call format's family, one without tool support) and calls
shared by the tool-calling tests."""

import json

from router.http.openai import tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOW]
USER = [{"role": "user", "content": "Weather in Paris?"}]

# Chat templates, one per family (with tool support) and one without.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<tool_call>...</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}"
    "{% if tools %}{{ tools | length }} tools{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}"
    "{# a call is written [TOOL_CALLS] [...] #}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
TEMPLATES = {"hermes": HERMES_TEMPLATE, "llama3_json": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
FORMATS = [tools.HERMES, tools.LLAMA3_JSON, tools.MISTRAL]
MARKERS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"]


def call_text(fmt: tools.CallFormat, *calls: tuple[str, dict]) -> str:
    """`calls` as `fmt` writes them."""
    return fmt.render((name, json.dumps(arguments)) for name, arguments in calls)


PARIS = ("get_weather", {"city": "Paris", "unit": "c"})
ROME = ("get_weather", {"city": "Rome"})
CLOCK = ("now", {})
