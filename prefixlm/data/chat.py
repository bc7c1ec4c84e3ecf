"""Chat rows rendered by a tokenizer's own chat template (transformers' `apply_chat_template`).

For supervised assistant turn k of a conversation `messages` (`rows.assistant_turns`: the last one,
or every one with turns="all"):

    prompt   = apply_chat_template(messages[:k], add_generation_prompt=True)  # inference feeds this
    full     = apply_chat_template(messages[:k + 1])
    sample   = prefix: prompt,  response: full[len(prompt):]

both tokenized by `apply_chat_template` itself, so prefix + response are exactly the template's
tokens of the conversation up to that turn, and the response is the turn as the template renders it
(its content or tool calls, then the template's end of turn, e.g. `Hello!<|im_end|>\\n`). System
prompts (a template's default one too), roles and tool turns are the template's business: a role
order it rejects is an error of that row. A template whose render of a turn does not start with the
tokens of its prompt (not prefix-preserving: one that renders a thinking block after the generation
prompt but strips it from history) is an error of that row; one that ignores add_generation_prompt
(the assistant header would be learned as output) or reads the clock (`strftime_now`, without a
`date_string` given) is refused when loaded.

The sample is the template's tokens alone: no prefix markers, no condition tokens (a row with a
condition is an error), no end-of-answer token beyond the template's own. Special-token strings in
the conversation's text stay plain text (`sanitize_control_tokens=True`) unless parse_special: the
template's own control tokens are tokens either way.

Needs transformers (`pip install 'prefixlm[hf]'`) and a tokenizer folder with a chat template
(tokenizer_config.json's `chat_template` or chat_template.jinja).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..extras import require
from .tokenizer import AUTO, load_tokenizer
from .render import EncodedRows
from .rows import FIELDS, RowError, assistant_turns, kind_of

__all__ = ["CHAT_TEMPLATES", "ChatTemplate", "parse_chat_record", "chat_template_folder",
           "encoded_from_ids", "special_text", "load_chat_tokenizer", "copy_template"]

CHAT_TEMPLATES = ("plain", "tokenizer")  # rows.render_chat, or the tokenizer's own template
TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                  "special_tokens_map.json")


def chat_template_folder(tokenizer_spec) -> Path:
    """The folder whose chat template `--chat-template tokenizer` uses: the tokenizer folder, or
    the folder holding the tokenizer.json given."""
    path = Path(str(tokenizer_spec))
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ValueError(f"--chat-template tokenizer needs a tokenizer folder with a chat "
                         f"template; --tokenizer is {str(tokenizer_spec)!r}")
    return path


def parse_chat_record(row: dict, turns: str = "last", names: dict | None = None
                      ) -> tuple[list[dict], list | None, list[int], int]:
    """A row for the chat template -> (messages, tools, supervised turn indices, trailing turns).

    An instruction row is the conversation [user: instruction, assistant: response]. Messages need
    a string role; content may be a string, a list (content parts) or absent/null (a turn of tool
    calls); other keys (tool_calls, name, ...) go to the template as they are."""
    names = names or {}
    names = {f: names.get(f, f) for f in FIELDS}
    if row.get(names["condition"]) is not None:
        raise RowError(f"field {names['condition']!r}: conditions cannot be rendered by "
                       f"--chat-template tokenizer (the template has no condition tokens); drop "
                       f"the field or use --chat-template plain", names["condition"])
    key = names["messages"]
    if key in row:
        messages = row[key]
        if not isinstance(messages, list) or not messages:
            raise RowError(f"field {key!r} must be a non-empty list", key)
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RowError(f"{key}[{k}] must be an object", key)
            if not isinstance(m.get("role"), str):
                got = "missing" if "role" not in m else kind_of(m["role"])
                raise RowError(f"{key}[{k}].role must be a string, got {got}", key)
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise RowError(f"{key}[{k}].content must be a string, a list of parts or null, "
                               f"got {kind_of(content)}", key)
    else:
        for role in ("instruction", "response"):
            value = row.get(names[role])
            if not isinstance(value, str):
                got = "missing" if names[role] not in row else f"a {kind_of(value)}"
                raise RowError(f"field {names[role]!r} must be a string, got {got} (expected "
                               f"{names['instruction']!r} and {names['response']!r}, or {key!r})",
                               names[role])
        messages = [{"role": "user", "content": row[names["instruction"]]},
                    {"role": "assistant", "content": row[names["response"]]}]
    tools = row.get(names["tools"])
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict)
                                                                  for t in tools)):
        raise RowError(f"field {names['tools']!r} must be a list of objects (tool schemas)",
                       names["tools"])
    picked = assistant_turns(messages, turns, key)
    return messages, tools, picked, len(messages) - picked[-1] - 1


def _texts(obj):
    """Every string inside messages (for the special-text count)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _texts(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _texts(value)


class ChatTemplate:
    """The chat template of a tokenizer folder, rendering conversations into samples."""

    def __init__(self, folder, parse_special: bool = False, template_kwargs: dict | None = None):
        transformers = require("transformers", "hf", "--chat-template tokenizer")
        self.folder = Path(folder)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.folder}: cannot load it as a Hugging Face tokenizer for "
                             f"--chat-template tokenizer: {exc}") from exc
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ValueError(f"{self.folder}: the tokenizer has no chat template "
                             f"(tokenizer_config.json 'chat_template' or chat_template.jinja); "
                             f"--chat-template tokenizer needs one, or use --chat-template plain")
        self.template = template
        self.kwargs = dict(template_kwargs or {})
        if "strftime_now" in template and "date_string" not in self.kwargs:
            raise ValueError(f"{self.folder}: the chat template reads today's date "
                             f"(strftime_now): samples would change from day to day; give "
                             f"chat_template_kwargs: {{date_string: ...}} in the mixture")
        self.sanitize = not parse_special
        probe = [{"role": "user", "content": "x"}]
        if self._ids(probe, None, True) == self._ids(probe, None, False):
            raise ValueError(f"{self.folder}: the chat template ignores add_generation_prompt: "
                             f"the assistant header would be part of every response")

    @property
    def eos_token(self) -> str | None:
        return self.tokenizer.eos_token

    @property
    def pad_token(self) -> str | None:
        return self.tokenizer.pad_token

    def fingerprint(self) -> str:
        """A hash of what decides the rendered tokens besides the vocabulary."""
        payload = {"template": self.template, "kwargs": self.kwargs, "sanitize": self.sanitize,
                   "specials": {k: str(v) for k, v in
                                sorted(self.tokenizer.special_tokens_map.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()) \
            .hexdigest()

    def _ids(self, messages, tools, generation_prompt: bool) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True,
            return_dict=False, sanitize_control_tokens=self.sanitize, **self.kwargs))

    def render(self, messages, tools, turns: list[int]) -> list[tuple[list[int], list[int]]]:
        """(prefix ids, response ids) per supervised turn; RowError naming the turn when the
        template fails or is not prefix-preserving there."""
        out = []
        for k in turns:
            if k == 0:
                raise RowError("messages[0] is an assistant turn: there is no conversation "
                               "before it for the chat template to render as its prompt",
                               "messages")
            try:
                prompt = self._ids(messages[:k], tools, True)
                full = self._ids(messages[:k + 1], tools, False)
            except Exception as exc:  # the template's raise_exception, or bad message contents
                raise RowError(f"the chat template fails on messages[:{k + 1}]: "
                               f"{type(exc).__name__}: {exc}", "messages") from None
            if full[:len(prompt)] != prompt:
                raise RowError(f"the chat template is not prefix-preserving at messages[{k}]: "
                               f"the conversation up to that turn does not start with the tokens "
                               f"of its prompt (add_generation_prompt), so no prefix/response "
                               f"split matches inference", "messages")
            out.append((prompt, full[len(prompt):]))
        return out


def encoded_from_ids(samples: list[tuple[list[int], list[int]]], special: list[bool]
                     ) -> EncodedRows:
    """EncodedRows of rendered (prefix ids, response ids) pairs: no markers around the prefix;
    the response's last token (the template's end of turn) stands where end of answer does."""
    n = len(samples)
    inst_len = np.fromiter((len(p) for p, _ in samples), np.int64, count=n)
    resp_len = np.fromiter((len(r) for _, r in samples), np.int64, count=n)
    tokens = np.fromiter((i for p, r in samples for i in (*p, *r)), np.int32,
                         count=int(inst_len.sum() + resp_len.sum()))
    zeros = np.zeros(n, np.int32)
    return EncodedRows(tokens=tokens, head_len=zeros, inst_len=inst_len, tail_len=zeros.copy(),
                       resp_len=resp_len, special_text=np.asarray(special, bool),
                       default_condition=np.zeros(n, bool))


def special_text(tok, messages) -> bool:
    """Whether any text of the conversation holds a special-token string."""
    return any(tok.holds_special_text(text) for text in _texts(messages))


def load_chat_tokenizer(spec, special_tokens=None, conditions=None, default_condition=AUTO,
                        parse_special_tokens=None, template_kwargs=None):
    """(tokenizer, ChatTemplate) of a tokenizer folder for --chat-template tokenizer.

    Without markers of its own (no --special-token / --hrm-text-tokens, and no tokenizer_info.json
    in the folder) a sample has none around the prefix, and the end of answer is the template
    tokenizer's eos (the token inference stops on), its pad the template's pad. Either way the
    template's answers must hold the end of answer, or generation would never stop."""
    chat = ChatTemplate(chat_template_folder(spec), bool(parse_special_tokens), template_kwargs)
    folder = chat.folder
    records = any((folder / f).is_file() for f in ("tokenizer_info.json", "metadata.json"))
    if special_tokens is None and not records:
        if not chat.eos_token:
            raise ValueError(f"{folder}: the chat tokenizer names no eos_token to end answers "
                             f"with; give --special-token eoa=TOKEN")
        special_tokens = {"inst_begin": None, "inst_end": None, "eoa": chat.eos_token,
                          "pad": chat.pad_token}
    tok = load_tokenizer(str(spec), special_tokens, conditions,
                         default_condition=default_condition,
                         parse_special_tokens=parse_special_tokens)
    if len(chat.tokenizer) != tok.vocab_size:
        raise ValueError(f"{folder}: its chat tokenizer has {len(chat.tokenizer)} tokens but the "
                         f"tokenizer {spec} has {tok.vocab_size}: give one folder holding both")
    _, response = chat.render([{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "y"}], None, [1])[0]
    if tok.eoa_id not in response:
        raise ValueError(f"{folder}: the chat template ends an answer with "
                         f"{chat.tokenizer.decode(response[1:])!r}, which does not hold the end "
                         f"of answer {tok.special_tokens['eoa']!r}: generation would not stop; "
                         f"give --special-token eoa=TOKEN with the template's end of turn")
    return tok, chat


def copy_template(chat: ChatTemplate, directory: Path) -> None:
    """The template's files into a dataset folder, so that it loads with its template."""
    import shutil

    for name in TEMPLATE_FILES:
        if (chat.folder / name).is_file():
            shutil.copyfile(chat.folder / name, Path(directory) / name)
