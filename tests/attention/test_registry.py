"""The backend table and the `auto` rule."""

import pytest
import torch

from prefixlm import SeqInfo, prefixlm_attention
from prefixlm.attention import AttentionInputs, prepare_attention, registry, resolve_backend
from prefixlm.attention.backends import flex


def _inputs(rows=8, device="cpu", head_dim=16, grad=False):
    return AttentionInputs(torch.device(device), torch.float32, rows, 2, 2, head_dim, grad)


def test_auto_picks_sdpa_on_cpu():
    """Guards the documented auto rule on CPU (the portable path)."""
    assert resolve_backend("auto", _inputs()).NAME == "sdpa"
    assert resolve_backend("auto", _inputs(grad=True)).NAME == "sdpa"


def test_auto_rule_by_shape_class(monkeypatch):
    """Guards the documented auto rule (README, registry): on an sm90 GPU, batches of 32k rows and
    more go to cudnn_flex first (then cuDNN's two passes before triton at head dim 128, triton
    before them otherwise, fa3 before triton forward only); shorter training batches to triton,
    shorter forward-only calls to fa3. The rule reads only static properties, so described inputs
    stand in for a GPU."""
    monkeypatch.setattr(registry, "_is_sm90", lambda index: True)

    def order(rows, head_dim, grad):
        return registry.AUTO_ORDER[registry.auto_class(_inputs(rows, "cuda:0", head_dim, grad))]

    assert order(65536, 128, True)[:3] == ("cudnn_flex", "cudnn", "triton")
    assert order(65536, 64, True)[:3] == ("cudnn_flex", "triton", "cudnn")
    assert order(65536, 128, False)[:3] == ("cudnn_flex", "fa3", "triton")
    assert order(16384, 128, True)[0] == "triton"
    assert order(16384, 128, False)[0] == "fa3"
    monkeypatch.setattr(registry, "_is_sm90", lambda index: False)
    assert order(65536, 128, True)[0] == "triton"
    assert order(65536, 128, False)[0] == "fa3"


def test_inputs_of_tensors_read_the_gradient_mode():
    """Guards `AttentionInputs.of`: a forward under no_grad is a forward-only call even when the
    tensors require grad."""
    q = torch.zeros(8, 4, 16, requires_grad=True)
    k = torch.zeros(8, 2, 16)
    assert AttentionInputs.of(q, k, k) == AttentionInputs(torch.device("cpu"), torch.float32, 8,
                                                          4, 2, 16, True)
    with torch.no_grad():
        assert not AttentionInputs.of(q, k, k).requires_grad


def test_unknown_and_unavailable_backends_explain_why():
    """Guards a typo or a missing optional kernel turning into a crash instead of a reason."""
    info = SeqInfo.from_lengths([3], [1])
    q = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        prefixlm_attention(q, q, q, info, backend="fast")
    with pytest.raises(NotImplementedError, match="fa3"):
        prefixlm_attention(q, q, q, info, backend="fa3")  # no FlashAttention-3 / no GPU here


def test_every_backend_follows_the_protocol():
    """Guards a backend module that lacks part of the protocol being registered."""
    for name, module in registry.BACKENDS.items():
        assert module.NAME == name
        needed = registry._REQUIRED[module.USES_OP]
        assert all(hasattr(module, attr) for attr in needed), name
    broken = type("Broken", (), {"NAME": "broken", "USES_OP": True, "__name__": "broken"})
    with pytest.raises(TypeError, match="lacks"):
        registry._register(broken)


def test_prepare_attention_resolves_auto_first(monkeypatch):
    """Guards `prepare_attention` under `auto`: it must prepare for the backend auto picks (here
    flex, forward-only on the CPU, when it leads the order) and report its name; with sdpa first
    there is nothing to prepare."""
    info = SeqInfo.from_lengths([3, 2], [1, 0], capacity=8)
    built = []
    monkeypatch.setattr(flex, "prepare", lambda info, inputs: built.append(inputs.rows))
    assert prepare_attention(info, _inputs(rows=8)) == "sdpa" and built == []
    monkeypatch.setitem(registry.AUTO_ORDER, "default", ("flex", "sdpa"))
    assert prepare_attention(info, _inputs(rows=8)) == "flex" and built == [8]
