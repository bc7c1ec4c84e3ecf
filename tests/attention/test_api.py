"""`prefixlm_attention`'s input checks and errors, and `decode_attention`."""

import pytest
import torch

from prefixlm import SeqInfo, prefixlm_attention
from prefixlm.attention import decode_attention, reference_attention


def _qkv(rows=8, hq=2, hkv=2, d=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(rows, hq, d, dtype=dtype, device=device),
            torch.randn(rows, hkv, d, dtype=dtype, device=device),
            torch.randn(rows, hkv, d, dtype=dtype, device=device))


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v: (q[0], k, v), "must be \\(T, heads, head_dim\\)"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), "floating point"),
    (lambda q, k, v: (q, k[:, :1], v), "same shape"),
    (lambda q, k, v: (q[:6], k[:6], v[:6]), "needs info.capacity = 8"),
    (lambda q, k, v: (q[:, :, :8], k, v), "same head_dim"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), "one device"),
])
def test_bad_inputs_raise(mutate, message):
    """Guards shapes, dtypes and devices that no backend can run reaching a kernel."""
    info = SeqInfo.from_lengths([3, 2], [1, 2], capacity=8)
    with pytest.raises(ValueError, match=message):
        prefixlm_attention(*mutate(*_qkv()), info, backend="sdpa")


def test_unknown_and_unavailable_backends_explain_why():
    """Guards a typo or a missing optional kernel turning into a crash instead of a reason."""
    info = SeqInfo.from_lengths([3], [1])
    q, k, v = _qkv(rows=4)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        prefixlm_attention(q, k, v, info, backend="fast")
    with pytest.raises(NotImplementedError, match="fa3"):
        prefixlm_attention(q, k, v, info, backend="fa3")  # no FlashAttention-3 / no GPU here


def test_zero_heads_and_zero_head_dim_raise_value_error():
    """Guards raw errors from deep inside a backend for degenerate shapes."""
    info = SeqInfo.from_lengths([2], [1])
    for shape in ((3, 0, 16), (3, 2, 0)):
        q = torch.zeros(*shape)
        with pytest.raises(ValueError, match="at least one head"):
            prefixlm_attention(q, q, q, info, backend="sdpa")


def test_empty_batch_differentiates_through_the_reference():
    """Guards `backend="reference"` on a batch without tokens: its output (all padding, all zero)
    must still be attached to q, so a training step on it can call backward."""
    info = SeqInfo.from_lengths([0, 0], [0, 0], capacity=4)
    q = torch.randn(4, 2, 8, requires_grad=True)
    out = prefixlm_attention(q, q, q, info, backend="reference")
    assert out.eq(0).all()
    out.sum().backward()
    assert q.grad is not None and q.grad.eq(0).all()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_decode_attention_equals_the_causal_rows_of_a_full_pass(heads):
    """Guards the KV-cache decode path: the last tokens' attention against all keys (prefix,
    earlier causal tokens, themselves) equals those rows of a full PrefixLM pass over the
    sequence, whatever the prefix length."""
    torch.manual_seed(0)
    hq, hkv = heads
    prefix, causal, new = 5, 4, 3
    rows = prefix + causal
    q, k, v = torch.randn(rows, hq, 16), torch.randn(rows, hkv, 16), torch.randn(rows, hkv, 16)
    full = reference_attention(q, k, v, SeqInfo.from_lengths([prefix], [causal]))
    out = decode_attention(q[-new:], k, v)
    torch.testing.assert_close(out, full[-new:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="queries but only"):
        decode_attention(q, k[:2], v[:2])


@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_batched_decode_attention_equals_a_full_pass_per_sequence(heads, new):
    """Guards the batched decode path (a padded cache of sequences of different lengths): each
    sequence's new rows must equal those rows of a full PrefixLM pass over that sequence alone,
    whatever the padding holds (here large finite garbage) and whatever its neighbours' lengths
    (a mask taken from the wrong row, or keys read past a sequence's length, would show)."""
    torch.manual_seed(1)
    hq, hkv = heads
    lengths, prefixes, cache_len = [4, 11, 7, 3], [1, 6, 0, 0], 13
    q = torch.randn(len(lengths), new, hq, 16, dtype=torch.float64)
    k = torch.randn(len(lengths), cache_len, hkv, 16, dtype=torch.float64) * 5
    v = torch.randn(len(lengths), cache_len, hkv, 16, dtype=torch.float64) * 50
    out = decode_attention(q, k, v, lengths=torch.tensor(lengths))
    assert out.shape == q.shape
    for b, (length, prefix) in enumerate(zip(lengths, prefixes)):
        qs = torch.randn(length, hq, 16, dtype=torch.float64)
        qs[-new:] = q[b]
        full = reference_attention(qs, k[b, :length], v[b, :length],
                                   SeqInfo.from_lengths([prefix], [length - prefix]),
                                   compute_dtype=torch.float64)
        torch.testing.assert_close(out[b], full[-new:], rtol=1e-10, atol=1e-10)
        # One sequence through the unbatched form: the same numbers.
        torch.testing.assert_close(decode_attention(q[b], k[b, :length], v[b, :length]), out[b],
                                   rtol=1e-12, atol=1e-12)


def test_batched_decode_attention_rejects_bad_lengths():
    """Guards a cache length outside [new tokens, cache rows] silently attending padding or
    nothing (a row with no key gives NaN), and lengths of the wrong shape."""
    q, k = torch.randn(2, 2, 2, 8), torch.randn(2, 5, 2, 8)
    for bad in ([1, 3], [3, 6]):
        with pytest.raises(ValueError, match=r"lie in \[2, 5\]"):
            decode_attention(q, k, k, lengths=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        decode_attention(q, k, k, lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="for a batch"):
        decode_attention(q[0], k[0], k[0], lengths=torch.tensor([3]))
