"""tokenizer_info: markers and conditions from either tool's keys, where the tokenizer is found."""

import json
import shutil

import pytest

from prefixlm.data import V1Dataset
from prefixlm.data.tokenizer import load_tokenizer

pytest.importorskip("tokenizers", reason="the foreign layouts use a HuggingFace tokenizer.json")


def _copy(src, dst, tokenizer_path=None, drop_own_copy=False):
    shutil.copytree(src, dst)
    if tokenizer_path is not None:
        meta = json.loads((dst / "metadata.json").read_text())
        meta["tokenizer_info"]["tokenizer_path"] = tokenizer_path
        (dst / "metadata.json").write_text(json.dumps(meta))
    if drop_own_copy:
        (dst / "tokenizer.json").unlink()
    return dst


@pytest.mark.parametrize("which", ["sampled", "sft"])
def test_markers_and_conditions_come_from_the_dataset(hrm_fixtures, which):
    """Guards `special token inst_begin '<|inst|>' is not in the tokenizer's vocabulary`: a foreign
    dataset's boq/eoq/eoa and condition_mapping must be its tokenizer's markers, and the default
    condition HRM-Text's inference uses (`direct`)."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(hrm_fixtures["tokenizer"]))
    tok = V1Dataset(hrm_fixtures[which]).tokenizer()
    assert (tok.inst_begin_id, tok.inst_end_id, tok.eoa_id) == tuple(
        ref.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|box_end|>"))
    assert tok.condition_ids == {"direct": ref.token_to_id("<|object_ref_start|>"),
                                 "cot": ref.token_to_id("<|object_ref_end|>"),
                                 "noisy": ref.token_to_id("<|quad_start|>"),
                                 "synth": ref.token_to_id("<|quad_end|>")}
    assert tok.default_condition == "direct" and tok.vocab_size == 400


def test_resolution_order_and_the_error_naming_every_place(hrm_fixtures, tmp_path, monkeypatch):
    """Guards the documented lookup of tokenizer_path: the dataset's own copy, then absolute, then
    relative to the dataset, then to the current directory, then the local Hub cache; a folder or
    a file; and an error that lists every place looked when none exists."""
    tok_file = hrm_fixtures["tokenizer"]
    elsewhere = tmp_path / "tok"
    elsewhere.mkdir()
    shutil.copy(tok_file, elsewhere / "tokenizer.json")

    # The SFT folder's own copy wins over a tokenizer_path that names nothing.
    ds = _copy(hrm_fixtures["sft"], tmp_path / "own", tokenizer_path="does/not/exist")
    assert load_tokenizer(str(ds)).path == ds / "tokenizer.json"

    # Absolute, as a folder and as the file.
    for stored in (str(elsewhere), str(elsewhere / "tokenizer.json")):
        ds = _copy(hrm_fixtures["sampled"], tmp_path / f"abs{len(stored)}", tokenizer_path=stored)
        assert load_tokenizer(str(ds)).path == elsewhere / "tokenizer.json"

    # Relative to the dataset (data_io's README layout: ../trained_tokenizers/...).
    ds = _copy(hrm_fixtures["sampled"], tmp_path / "rel", tokenizer_path="../tok")
    assert load_tokenizer(str(ds)).path.resolve() == (elsewhere / "tokenizer.json").resolve()

    # Relative to the current directory (where HRM-Text's tools ran).
    work = tmp_path / "work"
    (work / "out" / "tok").mkdir(parents=True)
    shutil.copy(tok_file, work / "out" / "tok" / "tokenizer.json")
    ds = _copy(hrm_fixtures["sampled"], tmp_path / "cwd", tokenizer_path="out/tok")
    monkeypatch.chdir(work)
    assert load_tokenizer(str(ds)).path.resolve() == \
        (work / "out" / "tok" / "tokenizer.json").resolve()

    # A Hub id, found in the local cache at its main revision.
    cache = tmp_path / "hub"
    snapshot = cache / "models--Org--Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(tok_file, snapshot / "tokenizer.json")
    (cache / "models--Org--Model" / "refs").mkdir()
    (cache / "models--Org--Model" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ds = _copy(hrm_fixtures["sampled"], tmp_path / "hub_ds", tokenizer_path="Org/Model")
    assert load_tokenizer(str(ds)).path == snapshot / "tokenizer.json"

    ds = _copy(hrm_fixtures["sampled"], tmp_path / "none", tokenizer_path="Other/Model")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(str(ds))
    message = str(info.value)
    for place in (ds / "tokenizer.json", ds / "Other/Model", work / "Other/Model",
                  cache / "models--Other--Model" / "snapshots"):
        assert str(place) in message
    assert "Hub id" in message and "tokenizer=PATH" in message


def test_override_replaces_the_file_and_keeps_the_markers(hrm_fixtures, tmp_path):
    """Guards `tokenizer=` on a foreign dataset: it names the tokenizer file, the markers and
    conditions stay the dataset's; a tokenizer of another size is refused, not used."""
    from datahelpers import train_bpe

    moved = tmp_path / "moved.json"
    shutil.copy(hrm_fixtures["tokenizer"], moved)
    ds = _copy(hrm_fixtures["sampled"], tmp_path / "d", tokenizer_path="/nowhere")
    with pytest.raises(FileNotFoundError, match="cannot find the dataset's tokenizer"):
        V1Dataset(ds).tokenizer()
    tok = V1Dataset(ds).tokenizer(str(moved))
    assert tok.path == moved and tok.eoa_id == load_tokenizer(str(hrm_fixtures["sft"])).eoa_id
    other = train_bpe(tmp_path / "other.json", ["<|im_start|> <|im_end|> <|box_end|>"] * 5,
                      specials=["<|im_start|>", "<|im_end|>", "<|box_end|>", "<|object_ref_start|>",
                                "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>"])
    with pytest.raises(ValueError, match="tokenizer_info.vocab_size is 400"):
        V1Dataset(ds).tokenizer(str(other))


def test_our_tokenizer_folder_round_trips(tmp_path):
    """Guards a checkpoint's tokenizer/ losing the markers: save() writes tokenizer_info.json
    and load_tokenizer(folder) rebuilds the same tokenizer (ids, default condition, rendering)."""
    tok = load_tokenizer("byte", {"inst_begin": "<s>", "pad": None}, ["direct", "cot"],
                         parse_special_tokens=True)
    tok.save(tmp_path)
    back = load_tokenizer(str(tmp_path))
    assert back.special_ids() == tok.special_ids() and back.condition_ids == tok.condition_ids
    assert back.default_condition == "direct" and back.parse_special
    assert back.encode_prefix("x", "cot,direct") == tok.encode_prefix("x", "cot,direct")
    info = json.loads((tmp_path / "tokenizer_info.json").read_text())
    assert (info["boq"], info["eoq"], info["eoa"]) == ("<s>", "<|/inst|>", "<|eoa|>")
    assert info["tokenizer_path"] == str(tmp_path.resolve())
