"""Chat rows through a tokenizer's own chat template: tokens equal apply_chat_template's, one
sample per assistant turn, templates that cannot be split refused."""

import re

import pytest

from datahelpers import CHATML_TEMPLATE, chat_tokenizer
from prefixlm.data.chat import ChatTemplate, parse_chat_record
from prefixlm.data.rows import RowError

pytest.importorskip("transformers", reason="chat templates need transformers")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks <|im_end|> bye"},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("chat") / "tok")


@pytest.mark.parametrize("sanitize", [True, False])
def test_every_turn_is_the_templates_render_split_at_its_prompt(folder, sanitize):
    """Guards the prompt/response split drifting from the template (TRL #3728's wrong masks):
    for every assistant turn, prefix + response are apply_chat_template's tokens of the
    conversation up to that turn, the prefix is the generation prompt's render (the assistant
    header in the prefix, not learned), and the response is the turn as rendered, ending with the
    template's end of turn; the template's default system prompt and the tool schemas lead every
    prefix, the tool result sits in the next prefix."""
    chat = ChatTemplate(folder, parse_special=not sanitize)
    hf = chat.tokenizer
    samples = chat.render(CONVERSATION, TOOLS, [1, 3, 5])
    for (prefix, response), k in zip(samples, [1, 3, 5]):
        full = hf.apply_chat_template(CONVERSATION[:k + 1], tools=TOOLS, tokenize=True,
                                      return_dict=False, sanitize_control_tokens=sanitize)
        prompt = hf.apply_chat_template(CONVERSATION[:k], tools=TOOLS, tokenize=True,
                                        return_dict=False, add_generation_prompt=True,
                                        sanitize_control_tokens=sanitize)
        assert prefix + response == list(full) and prefix == list(prompt)
        text = hf.decode(prefix)
        assert text.startswith("<|im_start|>system\nYou are helpful.\n<tools>")
        assert text.endswith("<|im_start|>assistant\n")
        assert hf.decode(response).endswith("<|im_end|>\n")
    assert hf.decode(samples[0][1]).startswith('<tool_call>\n{"name": "get_weather"')
    assert "<tool_response>\nsunny" in hf.decode(samples[1][0])
    # Control-token text in a message: plain text unless parse_special.
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    user_turn = samples[2][0][len(samples[1][0]) + len(samples[1][1]):]
    assert user_turn.count(im_end) == (1 if sanitize else 2)


def test_turns_last_and_all_and_instruction_rows():
    """Guards the turn selection: last = today's behaviour, all = every assistant turn, and an
    instruction row becoming a user/assistant pair."""
    row = {"messages": CONVERSATION}
    assert parse_chat_record(row, "last")[2:] == ([5], 0)
    assert parse_chat_record(row, "all")[2:] == ([1, 3, 5], 0)
    messages, tools, picked, _ = parse_chat_record({"instruction": "q", "response": "a"})
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert (tools, picked) == (None, [1])
    trailing = {"messages": CONVERSATION[:4] + [{"role": "user", "content": "more"}]}
    assert parse_chat_record(trailing, "all")[2:] == ([1, 3], 1)


@pytest.mark.parametrize("row, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"content": "q"}]}, r"messages\[0\].role must be a string, got missing"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string, a list"),
    ({"instruction": "q"}, "field 'response' must be a string, got missing"),
    ({"instruction": "q", "response": "a", "condition": "cot"}, "conditions cannot be rendered"),
    ({"instruction": "q", "response": "a", "tools": "x"}, "must be a list of objects"),
])
def test_bad_chat_rows(row, message):
    """Guards chat rows that would crash the template or render nonsense: each names the field."""
    with pytest.raises(RowError, match=message):
        parse_chat_record(row)


def test_template_errors_are_row_errors(folder):
    """Guards a template's raise_exception (or a conversation opening with the assistant)
    escaping as a traceback instead of a row error."""
    strict = CHATML_TEMPLATE.replace(
        "{%- for m in messages %}",
        "{%- for m in messages %}{%- if m.role == 'robot' %}{{ raise_exception('no robots') }}"
        "{%- endif %}", 1)
    chat = ChatTemplate(chat_tokenizer(folder.parent / "strict", strict))
    with pytest.raises(RowError, match="the chat template fails on messages.*no robots"):
        chat.render([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}],
                    None, [1])
    with pytest.raises(RowError, match="messages\\[0\\] is an assistant turn"):
        chat.render([{"role": "assistant", "content": "hi"}], None, [0])


def test_templates_that_cannot_be_split_are_refused(folder):
    """Guards silently wrong samples from templates (data_formats.md section 7's pitfalls): one
    that ignores add_generation_prompt (the header would be learned), one that renders history
    unlike its prompt (not prefix-preserving, e.g. thinking blocks), one reading the clock, and a
    tokenizer without a template."""
    ignoring = CHATML_TEMPLATE.replace("{%- if add_generation_prompt %}", "{%- if false %}")
    with pytest.raises(ValueError, match="ignores add_generation_prompt"):
        ChatTemplate(chat_tokenizer(folder.parent / "ignoring", ignoring))
    thinking = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n' }}{%- endif %}",
                                       "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
                                       "{%- endif %}")
    chat = ChatTemplate(chat_tokenizer(folder.parent / "thinking", thinking))
    with pytest.raises(RowError, match="not prefix-preserving at messages\\[1\\]"):
        chat.render(CONVERSATION[:2], None, [1])
    dated = "{{- strftime_now('%d %b %Y') }}" + CHATML_TEMPLATE
    with pytest.raises(ValueError, match="reads today's date"):
        ChatTemplate(chat_tokenizer(folder.parent / "dated", dated))
    assert ChatTemplate(folder.parent / "dated", template_kwargs={"date_string": "1 Jan 2026"})
    plain = chat_tokenizer(folder.parent / "plain")
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplate(plain)


def test_an_end_of_answer_the_template_never_writes_is_refused(folder):
    """Guards training chat samples whose end of answer (what generation stops on) never occurs in
    them: HRM-Text's <|box_end|> with a ChatML template that ends turns with <|im_end|>."""
    from prefixlm.data.chat import load_chat_tokenizer

    tok, _ = load_chat_tokenizer(folder)
    assert tok.special_tokens["eoa"] == "<|im_end|>" and tok.inst_begin_id is None
    with pytest.raises(ValueError, match=re.escape("does not hold the end of answer "
                                                   "'<|endoftext|>'")):
        load_chat_tokenizer(folder, special_tokens={"inst_begin": None, "inst_end": None,
                                                    "eoa": "<|endoftext|>", "pad": None})
