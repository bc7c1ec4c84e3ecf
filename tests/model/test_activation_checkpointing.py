"""Activation checkpointing: the same gradients as keeping every activation (eager, compiled
blocks), fewer saved activations, and no checkpointing where nothing is differentiated."""

import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.model import PrefixLM, preset_config

VOCAB = 64
PREFIX, CAUSAL, CAPACITY = [3, 5, 1, 0, 9, 2], [4, 0, 6, 5, 7, 1], 48
MODES = {"transformer": ["blocks"], "hrm": ["blocks", "cycles"]}


# HRM: 2 blocks per stack, 3 cycles of 2 L calls and 1 H call; bp_steps 4 differentiates the 3 H
# calls and the last L call, the other 5 calls run without autograd.
HRM = dict(H_cycles=3, L_cycles=2)
BP_STEPS = 4


def _model(arch, backend, mode="none", compile_backend=None):
    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=32, heads=4, kv_heads=2, ffn_hidden=64,
                        layers=4, arch=arch, **(HRM if arch == "hrm" else {}))
    model = PrefixLM(cfg, backend=backend)
    model.bp_steps = BP_STEPS if arch == "hrm" else None
    model.activation_checkpointing = mode
    if compile_backend is not None:
        for block in model.all_blocks():
            block.compile(backend=compile_backend, dynamic=False)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    info = SeqInfo.from_lengths(PREFIX, CAUSAL, capacity=CAPACITY)
    ids = torch.randint(0, VOCAB, (CAPACITY,), generator=g)
    pos = torch.cat([torch.arange(p + c) for p, c in zip(PREFIX, CAUSAL)]
                    + [torch.zeros(CAPACITY - info.total, dtype=torch.long)])
    return ids, pos, info


def _loss(model, ids, pos, info):
    logits = model(ids, pos, info)[: info.total]
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    return (logits * weights).sum()


def _grads(model):
    model.zero_grad()
    _loss(model, *_batch()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_gradients_equal_keeping_every_activation(arch, backend):
    """Guards the recomputation: checkpointed blocks (and HRM's checkpointed recurrence steps,
    some of which start from a state computed without autograd, so their inputs need no
    gradient) must give bitwise the gradients of the run that keeps every activation, through the
    custom attention op (sdpa) and without it (reference)."""
    expected = _grads(_model(arch, backend))
    for mode in MODES[arch]:
        got = _grads(_model(arch, backend, mode))
        assert got.keys() == expected.keys(), mode
        for name in expected:
            assert torch.equal(got[name], expected[name]), (mode, name)


@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_gradients_equal_with_compiled_blocks(arch):
    """Guards checkpointing around blocks compiled one by one (as the trainer compiles them):
    the recomputed forward runs the compiled block again and the gradients equal the compiled
    run without checkpointing."""
    torch._dynamo.reset()
    expected = _grads(_model(arch, "sdpa", compile_backend="aot_eager"))
    for mode in MODES[arch]:
        got = _grads(_model(arch, "sdpa", mode, compile_backend="aot_eager"))
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7,
                                       msg=f"{mode} {name}")


def test_gradients_equal_with_inductor_compiled_blocks():
    """Guards the trainer's real compile path (inductor) under HRM's step checkpointing."""
    torch._dynamo.reset()
    expected = _grads(_model("hrm", "sdpa", compile_backend="inductor"))
    got = _grads(_model("hrm", "sdpa", "cycles", compile_backend="inductor"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7, msg=name)


def _saved_bytes(model) -> int:
    """Bytes autograd keeps for the backward outside checkpointed regions."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model, *_batch())
    loss.backward()
    return total


@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_checkpointing_keeps_fewer_activations(arch):
    """Guards checkpointing that is configured but not engaged (its gradients would still be
    equal): blocks keep a fraction of the activations, HRM's whole steps fewer still."""
    none = _saved_bytes(_model(arch, "sdpa"))
    blocks = _saved_bytes(_model(arch, "sdpa", "blocks"))
    assert blocks < none / 3
    if arch == "hrm":
        assert _saved_bytes(_model(arch, "sdpa", "cycles")) < blocks


def test_no_checkpointing_without_autograd_and_bad_modes(monkeypatch):
    """Guards checkpoint calls in forwards that record nothing (evaluation, generation, HRM's
    calls outside bp_steps cost a recompute for nothing there), and modes that cannot apply."""
    from prefixlm.model import layers as layers_module
    from prefixlm.model import model as model_module

    calls = []
    for module in (model_module, layers_module):
        real = module.checkpoint
        monkeypatch.setattr(module, "checkpoint",
                            lambda fn, *a, real=real, **k: calls.append(fn) or real(fn, *a, **k))
    for mode in ("blocks", "cycles"):
        model = _model("hrm", "sdpa", mode)
        with torch.no_grad():
            model(*_batch())
        assert calls == []
        _loss(model, *_batch()).backward()
        # bp_steps 4 differentiated stack calls of 2 blocks each
        assert len(calls) == (BP_STEPS * 2 if mode == "blocks" else BP_STEPS), mode
        calls.clear()
    with pytest.raises(ValueError, match="needs model.arch=hrm"):
        _model("transformer", "sdpa", "cycles")
    with pytest.raises(ValueError, match="must be one of none, blocks, cycles"):
        _model("hrm", "sdpa", "layers")
