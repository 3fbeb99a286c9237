"""Structured outputs: what a request's output must match, from the fields OpenAI, vLLM and SGLang use,
and the grammar (llguidance's) that the scheduler enforces token by token.

One constraint per request, from any one of:
- OpenAI: `response_format` `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}` (`{"type": "text"}` is none);
- vLLM: `structured_outputs` with one of `json` (a schema), `regex`, `choice` (a list of strings), `grammar`
  (EBNF or Lark), `json_object`;
- SGLang: `json_schema` (a schema as a JSON string), `regex`, `ebnf`.
Two are a 400 naming the second. The api checks the shapes (`parse`, no library needed); the tokenizer
turns the constraint into a grammar and checks it against the vocabulary (`compile`, llguidance).

JSON comes out compact (no whitespace between tokens), so a model cannot fill the budget with spaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# A spec larger than this is refused before it is compiled: a hostile schema must not stall the server.
MAX_SPEC_BYTES = 64 * 1024


@dataclass
class Constraint:
    kind: str  # json_schema | json_object | regex | choice | grammar | lark (tool calls)
    spec: Any  # the schema (a dict), the regex or grammar text, or the list of choices
    param: str  # the request field it came from, for error messages

    def to_wire(self) -> list:
        return [self.kind, json.dumps(self.spec), self.param]

    @classmethod
    def from_wire(cls, data: list) -> Constraint:
        return cls(data[0], json.loads(data[1]), data[2])


class ConstraintError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _schema(value: Any, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"{param} is not valid JSON: {e.msg} at position {e.pos}", param) from None
    if not isinstance(value, (dict, bool)):
        raise ConstraintError(f"{param} must be a JSON schema (an object)", param)
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"{param} must be a non-empty string", param)
    return value


def _from_response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise ConstraintError('response_format must be an object with a "type": text, json_object or json_schema', "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", {"type": "object"}, "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js and "name" not in js:
            raise ConstraintError('response_format of type json_schema needs "json_schema": {"name", "schema"}',
                                  "response_format.json_schema")
        return Constraint("json_schema", _schema(js.get("schema", {"type": "object"}), "response_format.json_schema.schema"),
                          "response_format")
    raise ConstraintError(f"response_format type {kind[:40]!r} is not supported: text, json_object or json_schema", "response_format.type")


def _from_structured_outputs(so: Any) -> list[Constraint]:
    if not isinstance(so, dict):
        raise ConstraintError("structured_outputs must be an object with one of json, regex, choice, grammar, json_object",
                              "structured_outputs")
    found = []
    if so.get("json") is not None:
        found.append(Constraint("json_schema", _schema(so["json"], "structured_outputs.json"), "structured_outputs.json"))
    if so.get("regex") is not None:
        found.append(Constraint("regex", _text(so["regex"], "structured_outputs.regex"), "structured_outputs.regex"))
    if so.get("choice") is not None:
        choice = so["choice"]
        if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise ConstraintError("structured_outputs.choice must be a non-empty list of non-empty strings", "structured_outputs.choice")
        found.append(Constraint("choice", choice, "structured_outputs.choice"))
    if so.get("grammar") is not None:
        found.append(Constraint("grammar", _text(so["grammar"], "structured_outputs.grammar"), "structured_outputs.grammar"))
    if so.get("json_object"):
        found.append(Constraint("json_object", {"type": "object"}, "structured_outputs.json_object"))
    return found


def parse(body: dict) -> Constraint | None:
    """The request's one constraint, or None. Raises ConstraintError (a 400) for a bad shape or for two."""
    found: list[Constraint] = []
    if body.get("response_format") is not None:
        c = _from_response_format(body["response_format"])
        if c is not None:
            found.append(c)
    if body.get("structured_outputs") is not None:
        found += _from_structured_outputs(body["structured_outputs"])
    if body.get("json_schema") is not None:  # SGLang
        found.append(Constraint("json_schema", _schema(body["json_schema"], "json_schema"), "json_schema"))
    if body.get("regex") is not None:
        found.append(Constraint("regex", _text(body["regex"], "regex"), "regex"))
    if body.get("ebnf") is not None:
        found.append(Constraint("grammar", _text(body["ebnf"], "ebnf"), "ebnf"))
    if len(found) > 1:
        raise ConstraintError(f"one constraint per request: got {found[0].param} and {found[1].param}", found[1].param)
    if found and len(json.dumps(found[0].spec)) > MAX_SPEC_BYTES:
        raise ConstraintError(f"{found[0].param} is larger than this server's limit of {MAX_SPEC_BYTES} bytes", found[0].param)
    return found[0] if found else None


def grammar_of(c: Constraint) -> str:
    """llguidance's grammar text for a constraint (raises ConstraintError for one it cannot read)."""
    from llguidance import LLMatcher, grammar_from
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        if c.kind in ("json_schema", "json_object"):
            return LLMatcher.grammar_from_json_schema(c.spec, defaults={"whitespace_flexible": False})
        if c.kind == "regex":
            return LLMatcher.grammar_from_regex(c.spec)
        if c.kind == "lark":  # our own (tool calls)
            return grammar_from("lark", c.spec)
        if c.kind == "choice":
            return grammar_from("lark", "start: " + " | ".join(json.dumps(choice) for choice in c.spec))
        return grammar_from("lark", any_to_lark(c.spec))  # EBNF (GBNF, as llama.cpp and vLLM write it) or Lark
    except Exception as e:  # llguidance raises ValueError, RuntimeError or its converter's own errors
        raise ConstraintError(f"{c.param} could not be read: {str(e).splitlines()[0][:300]}", c.param) from None


def vocabulary(hf_dir: str, eos_ids: list[int]):
    """llguidance's view of the model's vocabulary: its tokenizer.json, the mask's width (the model's vocab
    size, or the tokenizer's when that has more tokens) and every token the model stops on, so a finished
    grammar allows each of them. ~1 s to build. None (and a warning) for a tokenizer llguidance cannot read:
    the server then answers constrained requests with a 400."""
    import logging
    from pathlib import Path

    from llguidance import LLTokenizer
    from tokenizers import Tokenizer

    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        path = str(Path(hf_dir) / "tokenizer.json")
        n_vocab = max(config["vocab_size"], Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True))
        return LLTokenizer(path, n_vocab=n_vocab, eos_token=list(eos_ids) or None)
    except Exception as e:  # the library's errors are ValueError, RuntimeError, or its own
        logging.getLogger("serve").warning("structured outputs are off: llguidance cannot read this tokenizer (%s)", str(e)[:200])
        return None


# A grammar whose check takes longer than this is refused (a schema that explodes in size).
CHECK_TIMEOUT_S = 5.0


def check(c: Constraint, vocab) -> str:
    """The grammar of `c`, checked against the vocabulary; ConstraintError when it is invalid or too complex."""
    import threading

    from llguidance import LLMatcher

    if vocab is None:
        raise ConstraintError(f"{c.param}: this model's tokenizer does not support structured outputs", c.param)
    grammar = grammar_of(c)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(LLMatcher.validate_grammar(grammar, vocab)), daemon=True)
    worker.start()
    worker.join(CHECK_TIMEOUT_S)
    if not result:
        raise ConstraintError(f"{c.param} is too complex: checking it took more than {CHECK_TIMEOUT_S:.0f} s", c.param)
    if result[0]:
        raise ConstraintError(f"{c.param} is not a valid constraint: {result[0].splitlines()[0][:300]}", c.param)
    return grammar
