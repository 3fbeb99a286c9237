"""Tool calls, the way OpenAI's chat API has them: the request's `tools` and `tool_choice` checked, the
conversation's tool calls and results made ready for a chat template, the grammar that makes `required` or a
named function a valid call, and the parser that turns the model's text back into `tool_calls`.

The format is Hermes' (Qwen 2.5 and many tool-tuned models write it; our built-in template,
`serve/tokenizer/hermes.jinja`, teaches it to models whose own template knows no tools):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first call is the message's `content`. Streaming, the parser holds back what could still
become `<tool_call>`, sends each call's name once with its id, then its arguments as they come, by index.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.api.protocol import APIError
from serve.constraints import MAX_SPEC_BYTES, Constraint
from serve.stops import held_back

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# The start of a call's body up to its arguments: the name is sent as soon as this matches.
_JSON = json.JSONDecoder()
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def check(tools: list[dict] | None, tool_choice: Any) -> tuple[list[dict] | None, str | dict]:
    """The tools a request offers the model (None: none) and its tool_choice, checked as OpenAI does
    (400s naming the field). tool_choice defaults to "auto" with tools, "none" without."""
    if tools is not None:
        if not tools:
            raise APIError(400, "tools must not be empty; leave it out to offer none", "tools")
        names = set()
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
                raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name", ...}}}}', f"tools[{i}]")
            name = fn.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise APIError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, _ . or -", f"tools[{i}].function.name")
            if name in names:
                raise APIError(400, f"tools[{i}]: a second function named {name!r}", f"tools[{i}].function.name")
            names.add(name)
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema (an object)", f"tools[{i}].function.parameters")
    if tool_choice is None:
        return tools, "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or a named function, got {tool_choice[:40]!r}", "tool_choice")
    elif not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
              and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)):
        raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
    if tools is None:
        raise APIError(400, "tool_choice is only allowed when tools are given", "tool_choice")
    if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in names:
        raise APIError(400, f"tool_choice names the function {tool_choice['function']['name'][:64]!r}, which is not in tools", "tool_choice")
    return tools, tool_choice


def _function(tool: dict) -> dict:
    fn = tool["function"]
    return {"name": fn["name"], "parameters": fn.get("parameters") or {"type": "object", "properties": {}}}


def constraint(tools: list[dict], tool_choice: str | dict, parallel: bool) -> Constraint | None:
    """`required` and a named function become a grammar (Lark, with each function's parameters as a JSON
    schema), so that even a small model answers with a call that parses; `auto` and `none` leave the text free."""
    if tool_choice in ("none", "auto"):
        return None
    if isinstance(tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    rules, calls = [], []
    for i, tool in enumerate(tools):
        fn = _function(tool)
        schema = {**fn["parameters"], "x-guidance": {"whitespace_flexible": False}}  # compact: no whitespace loops
        head = json.dumps(f'{OPEN}\n{{"name": {json.dumps(fn["name"])}, "arguments": ')
        rules.append(f"call_{i}: {head} args_{i} {json.dumps(chr(125) + chr(10) + CLOSE)}\nargs_{i}: %json {json.dumps(schema)}")
        calls.append(f"call_{i}")
    call = "call: " + " | ".join(calls)
    start = 'start: call ("\\n" call)*' if parallel and not isinstance(tool_choice, dict) else "start: call"
    grammar = "\n".join([start, call, *rules])
    if len(grammar) > MAX_SPEC_BYTES:
        raise APIError(400, f"the functions' parameters are larger than this server's limit of {MAX_SPEC_BYTES} bytes", "tools")
    return Constraint("lark", grammar, "tool_choice")


def template_messages(messages: list[dict]) -> list[dict]:
    """The conversation as chat templates expect it: an assistant's tool calls with their arguments as
    objects (OpenAI sends a JSON string), content "" where a client sent none."""
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None}
        m.setdefault("content", "")
        calls = m.get("tool_calls")
        if calls is not None:
            if not calls:
                del m["tool_calls"]
            else:
                m["tool_calls"] = [_template_call(c, i, j) for j, c in enumerate(calls)]
        out.append(m)
    return out


def _template_call(call: Any, i: int, j: int) -> dict:
    param = f"messages[{i}].tool_calls[{j}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, f'{param} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', param)
    arguments = fn.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{param}.function.arguments is not valid JSON: {e.msg}", f"{param}.function.arguments") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Call:
    index: int
    id: str = field(default_factory=new_id)
    body: str = ""  # the text after <tool_call> so far
    name: str | None = None  # once sent
    args_at: int = 0  # where the arguments start in body
    sent: int = 0  # characters of the arguments sent
    arguments: str = ""


class ToolParser:
    """One choice's text, fed as it comes, turned into content and tool-call deltas (OpenAI's stream shape)."""

    def __init__(self) -> None:
        self.held = ""  # text that might still be the start of <tool_call>
        self.call: _Call | None = None  # the call being written
        self.calls: list[_Call] = []
        self.content = ""

    def feed(self, text: str) -> dict:
        """A delta ({"content", "tool_calls"}, either may be missing) for a piece of the model's text."""
        out = _Delta()
        text = self.held + text
        self.held = ""
        while text:
            if self.call is None:
                at = text.find(OPEN)
                if at < 0:
                    keep = held_back(text, OPEN)
                    out.text(self, text[:len(text) - keep])
                    self.held = text[len(text) - keep:]
                    return out.value()
                out.text(self, text[:at])
                self.call = _Call(len(self.calls))
                text = text[at + len(OPEN):]
            else:
                body = self.call.body + text  # the tag may have begun in the last piece
                at = body.find(CLOSE)
                if at < 0:
                    self.call.body = body
                    self._stream_args(out, final=False)
                    return out.value()
                self.call.body, text = body[:at], body[at + len(CLOSE):]
                self._close(out, CLOSE)
        return out.value()

    def finish(self) -> dict:
        """What is left when the reply ends (a call cut short keeps what it has)."""
        out = _Delta()
        if self.call is not None:
            self._close(out)
        elif self.held:
            out.text(self, self.held)
            self.held = ""
        return out.value()

    def _head(self, out: _Delta) -> bool:
        call = self.call
        if call.name is None:
            m = HEAD.match(call.body)
            if m is None:
                return False
            call.name, call.args_at = json.loads(f'"{m.group(1)}"'), m.end()
            out.call(call.index, {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}})
        return True

    def _stream_args(self, out: _Delta, final: bool) -> None:
        call = self.call
        if not self._head(out):
            return
        raw = call.body[call.args_at:].lstrip()
        try:  # the arguments end where their JSON value does, whatever follows (the call's "}", a cut tag)
            args = raw[:_JSON.raw_decode(raw)[1]]
        except ValueError:  # not whole yet, or cut by max_tokens: hold back what may still close the call
            args = raw[:len(raw) - held_back(raw, CLOSE)].rstrip()
            if not final:  # a "}" here may be the call's own, not the arguments'
                args = args.rstrip(" \n\t}")
        if len(args) > call.sent and args.startswith(call.arguments):
            out.call(call.index, {"function": {"arguments": args[call.sent:]}})
            call.sent, call.arguments = len(args), args

    def _close(self, out: _Delta, tag: str = "") -> None:
        call = self.call
        if call.name is None and HEAD.match(call.body) is None:
            # Not the name-first form: the whole body, if it is a call at all.
            try:
                value = json.loads(call.body)
                name, args = value["name"], value.get("arguments", value.get("parameters", {}))
                assert isinstance(name, str)
            except (ValueError, KeyError, TypeError, AssertionError):
                self.call = None
                out.text(self, f"{OPEN}{call.body}{tag}")
                return
            call.name, call.arguments = name, json.dumps(args, ensure_ascii=False)
            out.call(call.index, {"id": call.id, "type": "function", "function": {"name": name, "arguments": call.arguments}})
        else:
            self._stream_args(out, final=True)
        self.calls.append(call)
        self.call = None


class _Delta:
    def __init__(self) -> None:
        self.content = ""
        self.calls: dict[int, dict] = {}

    def text(self, parser: ToolParser, text: str) -> None:
        if parser.calls:  # between and after calls, whitespace is layout, not content
            text = text if text.strip() else ""
        parser.content += text
        self.content += text

    def call(self, index: int, part: dict) -> None:
        """Parts of one call in one delta merge: the name entry, then its arguments appended."""
        entry = self.calls.setdefault(index, {"index": index})
        fn = part.pop("function")
        entry.update(part)
        have = entry.setdefault("function", {})
        if "name" in fn:
            have["name"] = fn["name"]
        have["arguments"] = have.get("arguments", "") + fn.get("arguments", "")

    def value(self) -> dict:
        delta = {}
        if self.content:
            delta["content"] = self.content
        if self.calls:
            delta["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return delta


def merge(a: dict, b: dict) -> dict:
    """Two deltas of one choice as one (the last piece of text and what finishing the parse left)."""
    out = _Delta()
    for d in (a, b):
        out.content += d.get("content", "")
        for part in d.get("tool_calls", []):
            part = dict(part)
            index = part.pop("index")
            out.call(index, part)
    return out.value()


def message(parser: ToolParser) -> dict:
    """The whole reply as a chat message: content (None when the reply is only calls) and tool_calls."""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in parser.calls]
    if not calls:
        return {"role": "assistant", "content": parser.content}
    return {"role": "assistant", "content": parser.content.strip() or None, "tool_calls": calls}
