"""The mixture file and data_io's prefix_config.yaml: reading, precedence, one-line errors."""

import pytest

from prefixlm.data.mixture_config import Sampling, read_mixture, resolve_sampling

# In the style of data_io's own prefix_config.yaml: comments, YAML 1.1 `20_000` integers, a
# prefix-only entry exempting names from a later, broader rule.
DATA_IO_RULES = """# Ordered: First match applies.

# SYNTH
- prefix: "SYNTH__"
  max_per_file: 20_000

# FLAN
- prefix: "flan__cot_"
- prefix: "flan__"
  max_per_file: 5_000
  long_context: drop

- prefix: "gsm8k_train.jsonl"
  repeat: 10
"""


def _mixture(tmp_path, text, rules=DATA_IO_RULES):
    (tmp_path / "prefix_config.yaml").write_text(rules)
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return path


def test_data_io_prefix_config_is_read_as_is(tmp_path):
    """Guards data_io's rules file: first match by name prefix wins (a later match is noted, as
    data_io warns), `20_000` is an int, a prefix-only rule exempts names from a later cap, and
    a name matching nothing gets every row once with data_io's default truncate."""
    mix = read_mixture(_mixture(tmp_path, "rules: prefix_config.yaml\nsources: [a.jsonl]\n"))
    rules = mix.rules
    synth = resolve_sampling("SYNTH__part0.parquet", {}, rules, "truncate-response")
    assert (synth.max_per_epoch, synth.repeat, synth.long_context) == (20000, 1,
                                                                       "truncate-response")
    cot = resolve_sampling("flan__cot_a.jsonl", {}, rules, "truncate-response")
    assert cot.max_per_epoch is None and cot.also_matched == ["flan__"]
    flan = resolve_sampling("flan__b.jsonl", {}, rules, "truncate-response")
    assert (flan.max_per_epoch, flan.long_context) == (5000, "drop")
    assert resolve_sampling("gsm8k_train.jsonl", {}, rules, "drop").repeat == 10
    other = resolve_sampling("other.jsonl", {}, rules, "truncate-response")
    assert (other.rule, other.rows_per_epoch(7)) == ("default", 7)


def test_entry_settings_win_over_rules_and_weight_replaces_caps():
    """Guards the precedence entry > first rule > defaults: an entry's weight replaces a rule's
    cap and repeat (not multiplied with them), an entry's repeat keeps the rule's cap."""
    rules = [{"prefix": "a", "given": {"max_per_epoch": 4, "repeat": 2}}]
    weighted = resolve_sampling("a.jsonl", {"weight": 0.5}, rules, "drop")
    assert (weighted.weight, weighted.max_per_epoch, weighted.repeat) == (0.5, None, 1)
    assert weighted.rows_per_epoch(10) == 5
    repeated = resolve_sampling("a.jsonl", {"repeat": 3}, rules, "drop")
    assert repeated.rows_per_epoch(10) == 12 and repeated.rule.startswith("source entry over")


@pytest.mark.parametrize("weight, kept, rows", [(0.5, 10, 5), (2.5, 4, 10), (1.0, 3, 3),
                                                (0.0, 9, 0), (0.01, 10, 0)])
def test_weight_is_rows_per_epoch_over_kept_rows(weight, kept, rows):
    """Guards the meaning of weight: round(weight x kept rows) per epoch (fractions sub-sample,
    above 1 up-samples)."""
    assert Sampling(weight=weight).rows_per_epoch(kept) == rows


def test_caps_and_repeats_follow_data_io():
    """Guards data_io's count: min(max_per_file, kept) x repeat."""
    assert Sampling(max_per_epoch=6).rows_per_epoch(20) == 6
    assert Sampling(max_per_epoch=6).rows_per_epoch(4) == 4
    assert Sampling(max_per_epoch=6, repeat=3).rows_per_epoch(4) == 12
    assert Sampling(repeat=0).rows_per_epoch(9) == 0


@pytest.mark.parametrize("text, expected", [
    ("sources:\n  - path: a.jsonl\n    wieght: 2\n", "mix.yaml:3: sources[0].wieght: unknown key"),
    ("sources:\n  - path: a.jsonl\n    repeat: -1\n", "mix.yaml:3: sources[0].repeat: expected "
                                                        "an int >= 0"),
    ("sources:\n  - path: a.jsonl\n    repeat: true\n", "sources[0].repeat: expected an int"),
    ("sources:\n  - path: a.jsonl\n    long_context: cut\n", "sources[0].long_context: expected "
                                                              "one of drop, truncate"),
    ("sources:\n  - path: a.jsonl\n    weight: 1\n    repeat: 2\n", "sources[0].weight: weight "
                                                                     "and repeat exclude"),
    ("sources:\n  - path: a.jsonl\n    weight: -1\n", "sources[0].weight: expected a number"),
    ("sources:\n  - path: a.jsonl\n    path: b.jsonl\n", "mix.yaml:3: sources[0].path: given "
                                                          "twice"),
    ("sources:\n  - path: a.jsonl\n    columns: {answer: x}\n", "sources[0].columns.answer: "
                                                                "unknown key"),
    ("sources:\n  - name: x\n", "mix.yaml:2: sources[0]: missing key 'path'"),
    ("sources: []\n", "mix.yaml:1: sources: expected a non-empty list"),
    ("source: [a.jsonl]\n", "mix.yaml:1: source: unknown key"),
    ("sources: [a.jsonl]\ncontext_size: big\n", "mix.yaml:2: context_size: expected an int"),
    ("sources: [a.jsonl]\nturns: some\n", "mix.yaml:2: turns: expected one of last, all"),
    ("sources: [a.jsonl\n", "mix.yaml:2: not valid YAML"),
    ("sources: [a.jsonl]\nrules: missing.yaml\n", "mix.yaml:2: rules: rules file 'missing.yaml' "
                                                  "does not exist"),
])
def test_bad_mixture_keys_are_one_line_errors(tmp_path, text, expected):
    """Guards silently ignored typos and tracebacks: every bad key or value names the file, the
    line and the key path, in one line."""
    with pytest.raises(ValueError) as info:
        read_mixture(_mixture(tmp_path, text))
    message = str(info.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.parametrize("rules, expected", [
    ("- prefix: a\n  max_per_file: ten\n", "prefix_config.yaml:2: [0].max_per_file: expected "
                                           "an int >= 0 or null"),
    ("- max_per_file: 3\n", "prefix_config.yaml:1: [0]: missing key 'prefix'"),
    ("- prefix: a\n  maxperfile: 3\n", "prefix_config.yaml:2: [0].maxperfile: unknown key"),
    ("prefix: a\n", "prefix_config.yaml: expected a list of rules"),
])
def test_bad_rules_name_the_rules_file(tmp_path, rules, expected):
    """Guards errors in a separate rules file being reported against the mixture file (or with no
    line): they name prefix_config.yaml, its line and the rule's key."""
    with pytest.raises(ValueError) as info:
        read_mixture(_mixture(tmp_path, "rules: prefix_config.yaml\nsources: [a.jsonl]\n",
                              rules=rules))
    assert expected in str(info.value), str(info.value)


def test_max_per_file_null_means_every_row(tmp_path):
    """Guards data_io's explicit `max_per_file: null` (no cap) being rejected or read as 0."""
    mix = read_mixture(_mixture(tmp_path, "rules: prefix_config.yaml\nsources: [a.jsonl]\n",
                                rules="- prefix: a\n  max_per_file: null\n  repeat: 2\n"))
    assert resolve_sampling("a.jsonl", {}, mix.rules, "drop").rows_per_epoch(5) == 10
