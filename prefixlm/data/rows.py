"""The input row schema of prepare-sft: instruction rows and chat rows, parsed and validated.

    {"instruction": str, "response": str, "condition"?: str}
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "condition"?: str}

`condition` is one tag or comma-separated tags (`"synth,cot"`), each declared; absent or null: the
tokenizer's default condition applies.

In a chat row the last assistant turn is the response and the turns before it are the instruction
(rendered by `render_chat`); turns after it are ignored (and counted). A bad row raises ValueError
with a message naming the field; the caller adds the file and line.
"""

from __future__ import annotations

import json

from .tokenizer import split_condition

__all__ = ["CHAT_ROLES", "parse_row", "render_chat"]

CHAT_ROLES = ("system", "user", "assistant", "tool")


def render_chat(messages: list[dict]) -> str:
    """Instruction text of the turns before the response (the chat template).

    A single user turn renders as its content alone, so a two-turn chat and an instruction row give the
    same tokens. Otherwise every turn renders as `"{role}: {content}"` and turns are joined by a blank
    line, e.g. `"system: Be brief.\\n\\nuser: Hi\\n\\nassistant: Hello\\n\\nuser: Bye"`.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def parse_row(raw: bytes, conditions: dict):
    """One JSONL line -> (instruction, response, condition, trailing_turns); raises ValueError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    condition = row.get("condition")
    if condition is not None:
        if not isinstance(condition, str):
            raise ValueError(f"field 'condition' must be a string, got {type(condition).__name__}")
        split_condition(condition, conditions)
    trailing = 0
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list")
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{k}] must be an object")
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    got = "missing" if key not in m else type(m[key]).__name__
                    raise ValueError(f"messages[{k}].{key} must be a string, got {got}")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"messages[{k}].role {m['role']!r} is not one of "
                                 f"{', '.join(CHAT_ROLES)}")
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last < 0:
            raise ValueError("messages has no assistant turn to use as the response")
        instruction = render_chat(messages[:last])
        response = messages[last]["content"]
        trailing = len(messages) - last - 1
    else:
        for key in ("instruction", "response"):
            if key not in row:
                raise ValueError(f"missing field {key!r} (expected 'instruction' and 'response', "
                                 f"or 'messages')")
            if not isinstance(row[key], str):
                raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        instruction, response = row["instruction"], row["response"]
    if "\\ud" in text or "\\uD" in text:  # JSON can smuggle lone surrogates that UTF-8 cannot hold
        for name, value in (("instruction", instruction), ("response", response)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{name} contains a lone surrogate (invalid unicode escape)")
    return instruction, response, condition, trailing
