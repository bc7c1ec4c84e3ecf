"""Model tests: backends agree, packing does not leak, KV-cache generation, HRM's gradient
routing, presets, HRM-Text's init."""

import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.model import PrefixLM, generate, preset_config
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


def _calls_with_grad(model, ids, pos, info):
    """'L'/'H' per stack call of one training forward, starred when it ran with gradient."""
    seen = []
    hooks = [stack.register_forward_hook(
        lambda module, args, out, name=name: seen.append(name + "*" * torch.is_grad_enabled()))
        for name, stack in model.stacks().items()]
    model(ids, pos, info)[: info.total].sum().backward()
    for hook in hooks:
        hook.remove()
    return " ".join(seen)


# HRM-Text's hrm_nocarry_bp_warmup with H_cycles=2, L_cycles=3, measured with hooks in its own
# code (notes: hrm_text_model.md, section 2.2): which stack calls run with gradient per bp_steps,
# and whether the embedding gets a gradient (only through H call 0, i.e. bp_steps >= 3).
HRM_TEXT_ROUTING = {
    1: ("L L L H L L L* H", False),
    2: ("L L L H L L L* H*", False),
    3: ("L L L H* L L L* H*", True),
    4: ("L L L H* L L* L* H*", True),
    5: ("L L L H* L* L* L* H*", True),
    6: ("L L L* H* L* L* L* H*", True),
}


@pytest.mark.parametrize("bp_steps", sorted(HRM_TEXT_ROUTING))
def test_hrm_bp_steps_route_the_gradient_as_hrm_text(bp_steps):
    """Guards the bp warm-up's gradient routing: the budget goes to the H calls first
    (min(H_cycles, bp_steps - 1)) and the differentiated calls are the last H_bp H calls and the
    last L_bp L calls, not the last bp_steps calls in order; the embedding gets a gradient only
    when H call 0 is differentiated, z_L_init never (a buffer), the LM head always."""
    ids, pos, info = _batch([4, 3], [2, 5], 16)
    model = _model("sdpa", arch="hrm", H_cycles=2, L_cycles=3)
    model.bp_steps = bp_steps
    calls, embedding_grad = HRM_TEXT_ROUTING[bp_steps]
    assert _calls_with_grad(model, ids, pos, info) == calls
    assert (model.model.embed_tokens.weight.grad is not None) == embedding_grad
    assert model.lm_head.weight.grad is not None
    assert "z_L_init" not in dict(model.named_parameters())
    blocks_grad = [p.grad is not None for p in model.model.H_module.parameters()]
    assert all(blocks_grad) == (bp_steps >= 2) and any(blocks_grad) == (bp_steps >= 2)


def test_model_computes_hrm_text_loop_from_the_formula():
    """Guards the recurrence itself (inputs of each step, no extra injection of x, the final norm
    of every stack call, the embedding scale, z_L_init): the model's logits equal the loop of
    HRM-Text's hrm_nocarry written out here with the model's own stacks and blocks."""
    from prefixlm.model.layers import rms_norm

    model = _model("sdpa", arch="hrm", H_cycles=2, L_cycles=3)
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    rope = rope_tables(pos, model.cfg.attn_head_dim, model.cfg.rope_theta)

    def stack(blocks, x):
        for block in blocks.layers:
            x = block(x, rope, info)
        return rms_norm(x, 1e-6)

    with torch.no_grad():
        z_H = model.model.embed_tokens.weight[ids] * 64 ** 0.5
        z_L = model.model.z_L_init
        for _ in range(2):
            for _ in range(3):
                z_L = stack(model.model.L_module, z_L + z_H)
            z_H = stack(model.model.H_module, z_H + z_L)
        expected = z_H @ model.lm_head.weight.T
        torch.testing.assert_close(model(ids, pos, info), expected, rtol=1e-12, atol=1e-12)


def test_init_is_hrm_text_lecun_normal():
    """Guards HRM-Text's initialisation: LeCun-normal std 1/sqrt(hidden) on every matrix that
    reads the residual stream, the embedding, the LM head and o_proj, 1/sqrt(ffn) on down_proj,
    samples wrapped into 3 std (fmod), z_L_init std 1 for hrm and 0 for the transformer."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=4000, arch="hrm", hidden=256, heads=2, layers=2)
    model = PrefixLM(cfg)
    for name, param in model.named_parameters():
        std = 1 / 768 ** 0.5 if name.endswith("down_proj.weight") else 1 / 256 ** 0.5  # F 768
        assert abs(param.std().item() / std - 1) < 0.03, name
        assert param.abs().max().item() <= 3 * 1.0148 * std, name
    assert abs(model.model.z_L_init.std().item() - 1) < 0.2
    transformer = PrefixLM(preset_config("tiny", vocab_size=10))
    assert transformer.model.z_L_init.abs().max() == 0 and transformer.cfg.scale == 128 ** 0.5


def test_rope_is_computed_in_fp32():
    """Guards RoPE rotated in bf16: at position 3000 bf16 angles are off by whole radians."""
    pos = torch.tensor([3000, 3001])
    x = torch.randn(2, 2, 64)
    exact = apply_rope(x, *rope_tables(pos, 64, 10000.0))
    low = apply_rope(x.bfloat16(), *rope_tables(pos, 64, 10000.0)).float()
    assert (low - exact).abs().max() < 0.05


def test_presets_match_hrm_text_sizes():
    """Guards preset drift from HRM-Text's config/arch/size: n_layers x hidden x heads, head dim
    128, SwiGLU width round(4 * hidden * 2/3) up to a multiple of 256, embedding scale sqrt(hidden),
    non-embedding parameters as HRM-Text counts them; hrm splits the layers over H and L."""
    expected = {"B": (12, 1024, 8, 2816, 166.7), "L": (24, 1280, 10, 3584, 526.9),
                "XL": (32, 1536, 12, 4096, 981.5), "XXL": (72, 1792, 14, 4864, 3038.8),
                "XXL_wide": (32, 2560, 20, 6912, 2747.3)}
    for name, (layers, hidden, heads, ffn, millions) in expected.items():
        for arch in ("transformer", "hrm"):
            with torch.device("meta"):
                model = PrefixLM(preset_config(name, vocab_size=1000, arch=arch))
            cfg = model.cfg
            assert (cfg.layers, cfg.hidden, cfg.heads, cfg.attn_head_dim, cfg.ffn_dim) == (
                layers, hidden, heads, 128, ffn)
            assert len(model.all_blocks()) == layers and cfg.scale == hidden ** 0.5
            blocks = model.num_params() - model.lm_head.weight.numel()
            assert round(blocks / 1e6, 1) == millions
            per_stack = layers // 2 if arch == "hrm" else layers
            assert len(model.model.H_module.layers) == per_stack
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
    """Guards the attention kernels' fast path: gqkv_proj's outputs are all head_dim wide
    ((2*4 + 2*2) heads of 16), so in bf16 the q, k, v views start and step on 16-byte boundaries
    with no padding columns: every row of the projection is used and gets a gradient."""
    from prefixlm.model import layers

    seen, attention = [], layers.prefixlm_attention

    def spy(q, k, v, info, backend):
        seen.append([t.stride(0) * t.element_size() for t in (q, k, v)]
                    + [t.data_ptr() % 16 for t in (q, k, v)])
        return attention(q, k, v, info, backend=backend)

    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=64, heads=4, kv_heads=2, ffn_hidden=96)
    model = PrefixLM(cfg, backend="sdpa").to(torch.bfloat16)
    monkeypatch.setattr(layers, "prefixlm_attention", spy)
    ids, pos, info = _batch(PREFIX, CAUSAL, CAPACITY)
    model(ids, pos, info).float().square().mean().backward()
    assert seen and all(value % 16 == 0 for values in seen for value in values), seen
    for block in model.all_blocks():
        grad = block.attn.gqkv_proj.weight.grad
        assert grad.shape[0] == 12 * 16 and (grad.abs().amax(1) > 0).all()


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
    for block in model.all_blocks():
        block.compile(backend="aot_eager", dynamic=False)
    for seed in (1, 2):
        _, _, other = _batch(CAUSAL, PREFIX, CAPACITY, seed=seed)  # new batch, same capacity
        model(ids, pos, other)
    out = model(ids, pos, _batch(PREFIX, CAUSAL, CAPACITY)[2])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["transformer", "hrm"])
@pytest.mark.parametrize("backend", ["triton", "cudnn", "fa3", "flex"])
def test_gpu_backends_train_the_fused_layout_in_bf16(backend, arch):
    """Guards the GPU kernels on the model's own layout (q and k fresh from RoPE, v a view of
    gqkv_proj's output with rows of (2*heads + 2*kv_heads) * head_dim elements, GQA 2:1, head dim
    128): under bf16 autocast their logits and gradients match the sdpa backend's within bf16
    noise."""
    from attentionhelpers import gpu_reason

    reason = gpu_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=512, heads=4, kv_heads=2, arch=arch)
    ids, pos, _ = _batch(PREFIX, CAUSAL, 256)
    ids, pos = ids.cuda(), pos.cuda()
    info = SeqInfo.from_lengths(PREFIX, CAUSAL, capacity=256, device="cuda")
    results = {}
    for name in ("sdpa", backend):
        torch.manual_seed(0)
        model = PrefixLM(cfg, backend=name).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, pos, info)[: info.total].float()
        logits.square().mean().backward()
        results[name] = (logits.detach(), {n: p.grad.float() for n, p in model.named_parameters()
                                           if p.grad is not None})
    (ref_logits, ref_grads), (logits, grads) = results["sdpa"], results[backend]
    _assert_near(logits, ref_logits, 2e-2, "logits")
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        _assert_near(grads[name], grad, 5e-2, name)
