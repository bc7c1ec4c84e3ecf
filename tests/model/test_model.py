"""Model tests: backends agree, packing does not leak, KV-cache generation, HRM, presets."""

import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.model import PRESETS, PrefixLM, generate, preset_config
from prefixlm.model.layers import apply_rope, rope_tables

VOCAB = 61


def _model(backend="reference", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=64, heads=4, kv_heads=2, ffn_hidden=96,
                        **overrides)
    return PrefixLM(cfg, backend=backend).double()


def _batch(prefix, causal, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    info = SeqInfo.from_lengths(prefix, causal, capacity=capacity)
    ids = torch.randint(0, VOCAB, (capacity,), generator=g)
    pos = torch.zeros(capacity, dtype=torch.long)
    at = 0
    for p, c in zip(prefix, causal):
        pos[at:at + p + c] = torch.arange(p + c)
        at += p + c
    return ids, pos, info


# Odd lengths, a zero-causal sample, a prefix-less one, one long among short, padding at the end.
PREFIX, CAUSAL, CAPACITY = [3, 5, 1, 0, 17, 2], [4, 0, 6, 5, 9, 1], 64


def _assert_near(actual, expected, rel, name=""):
    """max |actual - expected| <= rel * max |expected| (elementwise rtol fails on near-zeros)."""
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"


def _logits_and_grads(model, ids, pos, info):
    model.zero_grad()
    logits = model(ids, pos, info)
    real = logits[: info.total]
    weights = torch.linspace(-1, 1, real.numel(), dtype=real.dtype).view_as(real)
    (real * weights).sum().backward()
    return real.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_backends_agree_on_logits_and_grads(arch):
    """Guards a backend that masks, pads or differentiates differently from the reference: the same
    weights and batch must give the same logits and parameter gradients through sdpa as through
    the reference, and the same logits through flex. The model runs in fp64; the reference
    attention computes in fp32, hence fp32-level tolerances."""
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    ref = _logits_and_grads(_model("reference", arch=arch), ids, pos, info)
    sdpa = _logits_and_grads(_model("sdpa", arch=arch), ids, pos, info)
    _assert_near(sdpa[0], ref[0], 1e-5, "logits")
    for name in ref[1]:
        _assert_near(sdpa[1][name], ref[1][name], 1e-5, name)
    flex = _model("flex", arch=arch).float()
    with torch.no_grad():
        out = flex(ids, pos, info)[: info.total]
    _assert_near(out.double(), ref[0], 1e-4, "flex logits")
    try:  # FlexAttention's backward exists on CPU only in some torch builds
        flex_grads = _logits_and_grads(flex, ids, pos, info)[1]
    except NotImplementedError:
        return
    for name in ref[1]:
        _assert_near(flex_grads[name].double(), ref[1][name], 1e-3, "flex " + name)


def test_packing_does_not_leak_between_samples():
    """Guards cross-sample attention or position mix-ups: a sample's logits are the same alone and
    packed between other samples."""
    model = _model("sdpa")
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    packed = model(ids, pos, info)
    start = sum(PREFIX[:4]) + sum(CAUSAL[:4])
    n = PREFIX[4] + CAUSAL[4]
    alone = model(ids[start:start + n], pos[start:start + n],
                  SeqInfo.from_lengths([PREFIX[4]], [CAUSAL[4]]))
    torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-10, atol=1e-10)


def test_prefix_is_bidirectional_and_response_causal():
    """Guards a plain causal (or fully bidirectional) mask: changing the last prefix token changes
    the first prefix token's logits, changing a response token does not change earlier ones."""
    model = _model("sdpa")
    ids, pos, info = _batch([6], [5], 11)
    base = model(ids, pos, info)
    edited = ids.clone()
    edited[5] = (edited[5] + 1) % VOCAB
    assert not torch.allclose(model(edited, pos, info)[0], base[0])
    edited = ids.clone()
    edited[8] = (edited[8] + 1) % VOCAB
    torch.testing.assert_close(model(edited, pos, info)[:8], base[:8])


@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_generation_with_cache_equals_recomputation(arch):
    """Guards stale or misordered cache entries (HRM calls every block several times per token):
    greedy and sampled decoding with the KV cache give the tokens and logits of full
    recomputation."""
    model = _model("sdpa", arch=arch, seed=1)
    prompt = [5, 9, 2, 44, 17, 3, 8]
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        cached, cached_logits = generate(model, prompt, max_new_tokens=12, return_logits=True,
                                         **kwargs)
        full, full_logits = generate(model, prompt, max_new_tokens=12, use_cache=False,
                                     return_logits=True, **kwargs)
        assert cached == full and len(cached) == 12
        for a, b in zip(cached_logits, full_logits):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_generation_stops_at_stop_token():
    """Guards decoding past the end-of-answer token."""
    model = _model("sdpa")
    first = generate(model, [1, 2, 3], max_new_tokens=5)
    out = generate(model, [1, 2, 3], max_new_tokens=5, stop_id=first[1])
    assert out == first[: first.index(first[1]) + 1]


def test_hrm_gradient_only_through_last_cycles():
    """Guards HRM's truncated gradient: with grad_cycles < H_cycles the initial states (used only in
    the first cycle) get no gradient; with every cycle differentiated they do."""
    ids, pos, info = _batch([4, 3], [2, 5], 16)
    for grad_cycles, expect_grad in ((1, False), (2, True)):
        model = _model("sdpa", arch="hrm", H_cycles=2, L_cycles=2, grad_cycles=grad_cycles)
        model(ids, pos, info)[: info.total].sum().backward()
        assert (model.H_init.grad is not None) == expect_grad
        assert all(p.grad is not None for p in model.all_blocks()[0].parameters())


def test_rope_is_computed_in_fp32():
    """Guards RoPE rotated in bf16: at position 3000 bf16 angles are off by whole radians."""
    pos = torch.tensor([3000, 3001])
    x = torch.randn(2, 2, 64)
    exact = apply_rope(x, *rope_tables(pos, 64, 10000.0))
    low = apply_rope(x.bfloat16(), *rope_tables(pos, 64, 10000.0)).float()
    assert (low - exact).abs().max() < 0.05


def test_presets_match_hrm_text_sizes():
    """Guards preset drift: B / L / XL are 12x1024x8, 24x1280x10, 32x1536x12 and fields override."""
    expected = {"B": (12, 1024, 8), "L": (24, 1280, 10), "XL": (32, 1536, 12)}
    for name, (layers, hidden, heads) in expected.items():
        assert (PRESETS[name]["layers"], PRESETS[name]["hidden"], PRESETS[name]["heads"]) == (
            layers, hidden, heads)
        with torch.device("meta"):
            model = PrefixLM(preset_config(name, vocab_size=1000))
        assert len(model.blocks) == layers and model.cfg.head_dim == hidden // heads
    assert preset_config("B", vocab_size=10, layers=2).layers == 2


def test_bad_model_config_is_rejected():
    """Guards silently built broken shapes: the message names the field."""
    with pytest.raises(ValueError, match="heads"):
        PrefixLM(preset_config("tiny", vocab_size=10, hidden=130, heads=4))
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="arch"):
        PrefixLM(preset_config("tiny", vocab_size=10, arch="rnn"))


def test_qkv_views_have_16_byte_aligned_rows(monkeypatch):
    """Guards the attention kernels' fast path: with 4 heads of 16 + 2 kv heads the fused q/k/v/gate
    projection has 4*16 + 2*2*16 + 4 = 132 columns, whose bf16 rows (264 bytes) are no multiple of
    16 bytes; the layer pads it to 136 and never reads the padding (it gets no gradient)."""
    from prefixlm.model import layers

    seen, attention = [], layers.prefixlm_attention

    def spy(q, k, v, info, backend):
        seen.append([t.stride(0) * t.element_size() for t in (q, k, v)])
        return attention(q, k, v, info, backend=backend)

    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=64, heads=4, kv_heads=2, ffn_hidden=96)
    model = PrefixLM(cfg, backend="sdpa").to(torch.bfloat16)
    monkeypatch.setattr(layers, "prefixlm_attention", spy)
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    model(ids, pos, info).float().square().mean().backward()
    assert seen and all(stride % 16 == 0 for strides in seen for stride in strides), seen
    for block in model.all_blocks():
        grad = block.attn.qkvg.weight.grad
        assert grad.shape[0] == 136 and grad[132:].abs().max() == 0 and grad[:132].abs().max() > 0


@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_logits_of_chosen_rows_equal_those_rows_of_all_logits(arch):
    """Guards `forward(rows=...)`, which training uses to skip the LM head on unsupervised rows:
    the chosen rows' logits, in the order given, are the full forward's rows."""
    model = _model(arch=arch)
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    rows = torch.tensor([0, 2, 3, 17, 40, 41, 55])
    full = model(ids, pos, info)
    torch.testing.assert_close(model(ids, pos, info, rows=rows), full[rows], rtol=0, atol=1e-12)


def test_flex_blocks_compile_to_one_graph():
    """Guards Flex's block mask being built before the blocks run: built inside the first compiled
    block instead, that block traced to a graph of its own and Flex's kernels compiled twice (on
    the H200 each compile of the L model's Flex graphs takes minutes). Forward only: Flex has no
    CPU backward."""
    from torch._dynamo.utils import counters

    model = _model(backend="flex").float().requires_grad_(False)
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    expected = model(ids, pos, info)
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="aot_eager", dynamic=False)
    for seed in (1, 2):
        _, _, other = _batch(CAUSAL, PREFIX, CAPACITY, seed=seed)  # new batch, same capacity
        model(ids, pos, other)
    out = model(ids, pos, _batch(PREFIX, CAUSAL, CAPACITY)[2])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
