"""The input row schema: instruction rows, chat rows and their errors."""

import json

import pytest

from prefixlm.data.rows import parse_row, render_chat


def _row(obj) -> bytes:
    return json.dumps(obj).encode()


def test_chat_template():
    """Guards the chat template: one user turn = plain instruction; several = role-tagged."""
    assert render_chat([{"role": "user", "content": "hi"}]) == "hi"
    assert render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) \
        == "system: S\n\nuser: U"


def test_instruction_and_chat_rows_parse():
    """Guards both row shapes: a chat row's last assistant turn is the response, later turns are
    counted, and the condition must be declared."""
    assert parse_row(_row({"instruction": "a", "response": "b"}), {}) == ("a", "b", None, 0)
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
                         {"role": "user", "content": "more"}], "condition": "x"}
    assert parse_row(_row(chat), {"x": 7}) == ("q", "r", "x", 1)


@pytest.mark.parametrize("raw, message", [
    (b"\xff", "not valid UTF-8"),
    (b"{", "invalid JSON"),
    (b"[1]", "expected a JSON object"),
    (_row({"instruction": "a"}), "missing field 'response'"),
    (_row({"instruction": "a", "response": 3}), "field 'response' must be a string"),
    (_row({"instruction": "a", "response": "b", "condition": "nope"}), "unknown condition"),
    (_row({"messages": []}), "non-empty list"),
    (_row({"messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    (_row({"messages": [{"role": "robot", "content": "q"}]}), "is not one of"),
    (b'{"instruction": "\\ud800", "response": "b"}', "lone surrogate"),
])
def test_bad_rows_name_the_problem(raw, message):
    """Guards bad rows: each raises ValueError naming the field or the defect (prepare adds the
    file and line)."""
    with pytest.raises(ValueError, match=message):
        parse_row(raw, {})
