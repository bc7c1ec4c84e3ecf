"""The input row schema of prepare-sft and mixtures: instruction rows and chat rows, parsed and
validated.

    {"instruction": str, "response": str, "condition"?: str}
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "condition"?: str}

`condition` is one tag or comma-separated tags (`"synth,cot"`), each declared; absent or null: the
tokenizer's default condition applies.

A chat row gives one sample per supervised assistant turn: `turns="last"` the last assistant turn
(the turns after it are ignored, and counted), `turns="all"` every assistant turn. A sample's
response is that turn's content and its instruction the turns before it, rendered by
`render_chat` (`chat.py` renders them with a tokenizer's own chat template instead). A bad row
raises `RowError` (a ValueError) with a message naming the field; the caller adds the file and
line (or Parquet row).

Field names can be mapped (`names`): a mixture source may call its columns `prompt` and `answer`;
errors then name those.
"""

from __future__ import annotations

import json

from .tokenizer import split_condition

__all__ = ["CHAT_ROLES", "TURNS", "FIELDS", "RowError", "InputError", "MALFORMED_EXAMPLES",
           "parse_row", "decode_row",
           "parse_record", "render_chat", "assistant_turns", "kind_of"]

CHAT_ROLES = ("system", "user", "assistant", "tool")
TURNS = ("last", "all")
FIELDS = ("instruction", "response", "condition", "messages", "tools")


class RowError(ValueError):
    """A bad row; `field` is the (mapped) field or column at fault, None for the whole row."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InputError(ValueError):
    """Bad input data: the message names the file and line (or Parquet row and column)."""


MALFORMED_EXAMPLES = 20  # bad rows quoted in a report (prepare-sft's rows.jsonl has every one)


def kind_of(value) -> str:
    """A value's type as JSON names it where it has a name (null), else Python's."""
    return "null" if value is None else type(value).__name__


def render_chat(messages: list[dict]) -> str:
    """Instruction text of the turns before the response (the plain chat rendering).

    A single user turn renders as its content alone, so a two-turn chat and an instruction row give the
    same tokens. Otherwise every turn renders as `"{role}: {content}"` and turns are joined by a blank
    line, e.g. `"system: Be brief.\\n\\nuser: Hi\\n\\nassistant: Hello\\n\\nuser: Bye"`.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def assistant_turns(messages: list[dict], turns: str, field: str = "messages") -> list[int]:
    """Indices of the supervised assistant turns: the last one, or all of them."""
    found = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if not found:
        raise RowError(f"{field} has no assistant turn to use as the response", field)
    return found if turns == "all" else found[-1:]


def decode_row(raw: bytes) -> tuple[dict, bool]:
    """One JSONL line -> (the JSON object, whether its text may hold a lone surrogate escape)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    # JSON can smuggle lone surrogates that UTF-8 cannot hold; only escapes can make one.
    return row, "\\ud" in text or "\\uD" in text


def _condition(row: dict, conditions, names: dict) -> str | None:
    key = names["condition"]
    condition = row.get(key)
    if condition is not None:
        if not isinstance(condition, str):
            raise RowError(f"field {key!r} must be a string, got {kind_of(condition)}", key)
        try:
            split_condition(condition, conditions)
        except ValueError as exc:
            raise RowError(str(exc), key) from None
    return condition


def _check_text(samples, surrogates: bool) -> None:
    if not surrogates:
        return
    for instruction, response, _, _ in samples:
        for name, value in (("instruction", instruction), ("response", response)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(f"{name} contains a lone surrogate (invalid unicode escape)")


def _messages(row: dict, names: dict) -> list[dict]:
    key = names["messages"]
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        raise RowError(f"field {key!r} must be a non-empty list", key)
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"{key}[{k}] must be an object", key)
        for part in ("role", "content"):
            if not isinstance(m.get(part), str):
                got = "missing" if part not in m else kind_of(m[part])
                raise RowError(f"{key}[{k}].{part} must be a string, got {got}", key)
        if m["role"] not in CHAT_ROLES:
            raise RowError(f"{key}[{k}].role {m['role']!r} is not one of "
                           f"{', '.join(CHAT_ROLES)}", key)
    return messages


def parse_record(row: dict, conditions, turns: str = "last", names: dict | None = None,
                 surrogates: bool = True) -> tuple[list[tuple], int]:
    """A row as a dict -> ([(instruction, response, condition, turn), ...], trailing_turns).

    `turn` is the index of the response's message in a chat row, -1 for an instruction row;
    `trailing_turns` counts the messages after the last supervised turn. `names` maps the schema's
    field names (FIELDS) to the row's; `surrogates`: check the texts for lone surrogates."""
    names = names or {}
    names = {f: names.get(f, f) for f in FIELDS}
    condition = _condition(row, conditions, names)
    if names["messages"] in row:
        messages = _messages(row, names)
        picked = assistant_turns(messages, turns, names["messages"])
        samples = [(render_chat(messages[:k]), messages[k]["content"], condition, k)
                   for k in picked]
        trailing = len(messages) - picked[-1] - 1
    else:
        for role in ("instruction", "response"):
            key = names[role]
            if key not in row:
                raise RowError(f"missing field {key!r} (expected {names['instruction']!r} and "
                               f"{names['response']!r}, or {names['messages']!r})", key)
            if not isinstance(row[key], str):
                raise RowError(f"field {key!r} must be a string, got {kind_of(row[key])}", key)
        samples = [(row[names["instruction"]], row[names["response"]], condition, -1)]
        trailing = 0
    _check_text(samples, surrogates)
    return samples, trailing


def parse_row(raw: bytes, conditions):
    """One JSONL line -> (instruction, response, condition, trailing_turns) of its last assistant
    turn (prepare-sft's row); raises RowError."""
    row, surrogates = decode_row(raw)
    samples, trailing = parse_record(row, conditions, "last", surrogates=surrogates)
    instruction, response, condition, _ = samples[0]
    return instruction, response, condition, trailing
