"""Reader of HRM-Text "V1" datasets: ours, HRM-Text's SFT output and data_io's sampled output.

    DIR/metadata.json          {"max_seq_len": int, "tokenizer_info": {...}, "total_length": ...}
    DIR/tokens.npy             1-D integer token stream (uint8, uint16, int32, ...; memory-mapped)
    DIR/epoch_k/{inst_start,inst_len,resp_start,resp_len}.npy   k = 0, 1, ... (consecutive)

Sample i of epoch k is `tokens[inst_start[i] : inst_start[i] + inst_len[i]]` (the prefix) followed by
`tokens[resp_start[i] : resp_start[i] + resp_len[i]]` (the response, whose last token is predicted
but never read). Epochs may hold different samples (data_io samples a subset per epoch).

Everything is validated against the arrays themselves when first used (indices within tokens.npy,
resp_len >= 1, inst_len + resp_len <= max_seq_len; token ids below tokenizer_info.vocab_size by
`validate` and by the loader batch by batch); problems raise `ValueError` naming the file. The
writers disagree on `total_length` (HRM-Text's SFT script: len(tokens.npy); data_io: the mean
sampled tokens per epoch, while its tokens.npy holds every row of every source; our mixtures follow
data_io), so outside prepare-sft's datasets it is information (`total_length_note`), not a check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["V1Dataset", "EpochIndex", "INDEX_FIELDS", "length_histogram", "load_npy", "WRITER",
           "MIXTURE_WRITER", "OUR_WRITERS", "FORMAT"]

INDEX_FIELDS = ("inst_start", "inst_len", "resp_start", "resp_len")
FORMAT = "hrm-text-v1"  # metadata["format"] of the datasets we write
WRITER = "prefixlm prepare-sft"  # metadata["writer"] of the datasets prepare-sft writes
MIXTURE_WRITER = "prefixlm prepare --mixture"  # and of those a mixture writes
OUR_WRITERS = (WRITER, MIXTURE_WRITER)
TOKEN_SCAN_CHUNK = 1 << 24


class EpochIndex(NamedTuple):
    inst_start: np.ndarray
    inst_len: np.ndarray
    resp_start: np.ndarray
    resp_len: np.ndarray

    @property
    def prefix_lens(self) -> np.ndarray:
        return self.inst_len

    @property
    def causal_lens(self) -> np.ndarray:
        """Causal tokens after the autoregressive shift."""
        return self.resp_len - 1

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.inst_len)


def length_histogram(values: np.ndarray) -> dict:
    """Counts per power-of-two bucket: key "a-b" covers a <= x <= b."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0:
        return {}
    top = int(values.max())
    edges = [0, 1] + [2 ** k + 1 for k in range(1, max(1, top.bit_length()) + 1)]
    counts, _ = np.histogram(values, bins=edges)
    return {(f"{lo}" if hi - 1 == lo else f"{lo}-{hi - 1}"): int(c)
            for lo, hi, c in zip(edges[:-1], edges[1:], counts) if c}


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing file")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npy array: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected integers, got dtype {arr.dtype}")
    return arr


class V1Dataset:
    """A prepared dataset: `metadata`, `num_epochs`, `tokens`, `epoch(k)`, `tokenizer()`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"dataset {self.path} does not exist or is not a directory")
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            raise ValueError(f"{meta_path}: missing file (not a prepared dataset, or an interrupted "
                             f"write)")
        try:
            self.metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path}: not valid JSON: {exc}") from exc
        if not isinstance(self.metadata, dict):
            raise ValueError(f"{meta_path}: expected a JSON object")
        msl = self.metadata.get("max_seq_len")
        if isinstance(msl, bool) or not isinstance(msl, int) or msl < 1:
            raise ValueError(f"{meta_path}: 'max_seq_len' must be a positive int, got {msl!r}")
        info = self.metadata.get("tokenizer_info", {})
        if not isinstance(info, dict):
            raise ValueError(f"{meta_path}: 'tokenizer_info' must be an object, got "
                             f"{type(info).__name__}")
        self.tokens = load_npy(self.path / "tokens.npy", mmap=True)
        total = self.metadata.get("total_length")
        # prepare-sft records len(tokens.npy); a mixture, like data_io, the mean tokens per epoch.
        if str(self.metadata.get("writer", "")).startswith(WRITER) and isinstance(total, int) and \
                total != len(self.tokens):
            raise ValueError(f"{self.path / 'tokens.npy'}: holds {len(self.tokens)} tokens but "
                             f"metadata.json says total_length = {total} (written by "
                             f"{WRITER}, which records len(tokens.npy): a damaged dataset)")
        vocab = info.get("vocab_size")
        self.vocab_size = int(vocab) if isinstance(vocab, int) and not isinstance(
            vocab, bool) else None
        k = 0
        while (self.path / f"epoch_{k}").is_dir():
            k += 1
        if k == 0:
            raise ValueError(f"{self.path}: no epoch_0 directory")
        self.num_epochs = k
        self._epochs: dict[int, EpochIndex] = {}

    @property
    def ours(self) -> bool:
        """Whether prefixlm wrote this dataset (its metadata names the writer)."""
        return str(self.metadata.get("writer", "")).startswith(OUR_WRITERS)

    @property
    def origin(self) -> str:
        """Which tool wrote this dataset, as far as its files tell."""
        if self.ours:
            return str(self.metadata["writer"])
        info = self.metadata.get("tokenizer_info", {})
        has = {name: (self.path / name).is_file() for name in ("tokenizer.json",
                                                               "tokenizer_info.json")}
        if has["tokenizer_info.json"] and has["tokenizer.json"]:
            return "HRM-Text scripts/prepare_sft_data.py (tokenizer.json and tokenizer_info.json)"
        if "tokenizer_path" in info and not has["tokenizer.json"]:
            return "data_io sample_tokenized.py (tokenizer_info names the tokenizer, no copy)"
        return "another V1 writer"

    def total_length_note(self) -> str:
        """What metadata.json's total_length means here (each writer has its own convention)."""
        total = self.metadata.get("total_length")
        if not isinstance(total, int) or isinstance(total, bool):
            return f"total_length {total!r} (not an int)"
        if total == len(self.tokens):
            return f"total_length {total} = len(tokens.npy)"
        sums = [int(self.epoch(k).inst_len.sum() + self.epoch(k).resp_len.sum())
                for k in range(self.num_epochs)]
        if total == int(round(sum(sums) / len(sums))):
            return (f"total_length {total} = mean sampled tokens per epoch (data_io's convention; "
                    f"tokens.npy holds {len(self.tokens)})")
        return (f"total_length {total} matches neither len(tokens.npy) = {len(self.tokens)} nor "
                f"the mean tokens per epoch {sum(sums) / len(sums):.1f} (information only: nothing "
                f"reads it)")

    @property
    def max_seq_len(self) -> int:
        """Longest sample the model reads (inst_len + resp_len - 1 <= max_seq_len - 1)."""
        return int(self.metadata["max_seq_len"])

    def epoch(self, k: int) -> EpochIndex:
        """Index arrays of epoch k (int64, validated)."""
        if not 0 <= k < self.num_epochs:
            raise ValueError(f"epoch {k} out of range: {self.path} has {self.num_epochs} epochs")
        if k not in self._epochs:
            self._epochs[k] = self._load_epoch(k)
        return self._epochs[k]

    def _load_epoch(self, k: int) -> EpochIndex:
        folder = self.path / f"epoch_{k}"
        arrays = {name: load_npy(folder / f"{name}.npy", mmap=False).astype(np.int64, copy=False)
                  for name in INDEX_FIELDS}
        n = len(arrays["inst_start"])
        for name, arr in arrays.items():
            if len(arr) != n:
                raise ValueError(f"{folder}: length mismatch: {name}.npy has {len(arr)} entries, "
                                 f"inst_start.npy has {n}")
        total = len(self.tokens)
        for kind in ("inst", "resp"):
            start, length = arrays[f"{kind}_start"], arrays[f"{kind}_len"]
            for what, bad in ((f"{kind}_start < 0", start < 0), (f"{kind}_len < 0", length < 0),
                              (f"{kind}_start + {kind}_len > len(tokens) = {total}",
                               start + length > total)):
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise ValueError(f"{folder}: sample {i}: {what} (start {int(start[i])}, len "
                                     f"{int(length[i])}); {int(bad.sum())} such samples")
        short = arrays["resp_len"] < 1
        if short.any():
            i = int(np.flatnonzero(short)[0])
            raise ValueError(f"{folder}: sample {i}: resp_len = 0; a response needs at least its "
                             f"end-of-answer token ({int(short.sum())} such samples)")
        long = arrays["inst_len"] + arrays["resp_len"] > self.max_seq_len
        if long.any():
            i = int(np.flatnonzero(long)[0])
            raise ValueError(f"{folder}: sample {i}: inst_len + resp_len = "
                             f"{int(arrays['inst_len'][i] + arrays['resp_len'][i])} exceeds "
                             f"metadata.json's max_seq_len {self.max_seq_len} "
                             f"({int(long.sum())} such samples)")
        return EpochIndex(**arrays)

    def count_short(self, min_causal: int) -> list[int]:
        """Per epoch, the samples with fewer than `min_causal` causal tokens (what the loader
        skips); read from resp_len.npy alone, without loading the epochs."""
        return [int((load_npy(self.path / f"epoch_{k}" / "resp_len.npy", mmap=True) - 1
                     < min_causal).sum()) for k in range(self.num_epochs)]

    def validate(self, vocab_size: int | None = None, progress: bool = False) -> None:
        """Load and check every epoch, and every token id against the vocabulary size
        (`vocab_size`, else tokenizer_info.vocab_size; unchecked when neither is known)."""
        for k in range(self.num_epochs):
            self.epoch(k)
        self.check_token_ids(vocab_size, progress)

    def check_token_ids(self, vocab_size: int | None = None, progress: bool = False) -> None:
        """ValueError naming the first token id outside [0, vocab_size) in tokens.npy."""
        vocab = self.vocab_size if vocab_size is None else int(vocab_size)
        if vocab is None:
            return
        n = len(self.tokens)
        starts = range(0, n, TOKEN_SCAN_CHUNK)
        if progress and n > TOKEN_SCAN_CHUNK:
            from tqdm import tqdm
            starts = tqdm(starts, desc="checking token ids", unit="chunk")
        signed = np.issubdtype(self.tokens.dtype, np.signedinteger)
        for start in starts:
            chunk = np.asarray(self.tokens[start:start + TOKEN_SCAN_CHUNK])
            if chunk.max() < vocab and not (signed and chunk.min() < 0):
                continue
            bad = (chunk >= vocab) | (chunk < 0) if signed else chunk >= vocab
            first = int(np.flatnonzero(bad)[0])
            count = int(bad.sum())
            raise ValueError(f"{self.path / 'tokens.npy'}: token id {int(chunk[first])} at "
                             f"position {start + first} is outside the vocabulary [0, {vocab}) "
                             f"(tokenizer_info.vocab_size); {count} such tokens in positions "
                             f"[{start}, {start + len(chunk)})")

    def sample(self, k: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prefix tokens, response tokens) of sample i of epoch k."""
        e = self.epoch(k)
        return (np.asarray(self.tokens[e.inst_start[i]: e.inst_start[i] + e.inst_len[i]]),
                np.asarray(self.tokens[e.resp_start[i]: e.resp_start[i] + e.resp_len[i]]))

    def tokenizer(self, override=None):
        """The tokenizer these tokens were made with (`tokenizer_info.py` says where it is looked
        for); `override`: a tokenizer.json (or "byte") to use instead, with the recorded markers."""
        from .tokenizer_info import tokenizer_of_folder
        return tokenizer_of_folder(self.path, override)

    def pad_id(self) -> int:
        """Padding id from the metadata (0 for datasets that do not record one)."""
        pad = self.metadata.get("tokenizer_info", {}).get("special_ids", {}).get("pad")
        return int(pad) if isinstance(pad, int) else 0

    def __repr__(self) -> str:
        return f"V1Dataset({str(self.path)!r}, tokens={len(self.tokens)}, epochs={self.num_epochs})"
