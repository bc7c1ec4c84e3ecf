"""The accuracy rule itself (`prefixlm.attention.verify.error_stat`): it must pass the right
answer rounded to the kernel's dtype and fail the mistakes a kernel makes (a wrong mask, an error
above rounding, NaN, padding not zeroed), in 16-bit and in fp32."""

import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.attention.reference import reference_attention
from prefixlm.attention.verify import error_stat, make_case


def _outputs(case, dtype, info=None):
    """(oracle, PyTorch in `dtype`, a "kernel": the reference in fp64 rounded to `dtype`)."""
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    info = info or case.info
    oracle = reference_attention(case.q, case.k, case.v, case.info, None, oracle_dtype)
    same = reference_attention(case.q.to(dtype), case.k.to(dtype), case.v.to(dtype), case.info,
                               None, dtype)
    kernel = reference_attention(case.q.double(), case.k.double(), case.v.double(), info, None,
                                 torch.float64).to(dtype)
    return oracle, same, kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rule_passes_the_rounded_exact_answer(dtype):
    case = make_case("edge_mix", 3, dtype=torch.float32, max_len=200)
    oracle, same, kernel = _outputs(case, dtype)
    assert error_stat("out", kernel, oracle, same, case.info.total).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rule_fails_a_causal_mask_on_the_prefix(dtype):
    """The classic bug: prefix tokens attending causally instead of bidirectionally."""
    case = make_case("random", 4, dtype=torch.float32, max_len=200)
    lens = case.info.host_lens
    causal_only = SeqInfo.from_lengths([0] * lens.shape[1], (lens[0] + lens[1]).tolist(),
                                       capacity=case.info.capacity)
    oracle, same, kernel = _outputs(case, dtype, info=causal_only)
    assert not error_stat("out", kernel, oracle, same, case.info.total).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rule_fails_errors_above_rounding_nan_and_padding(dtype):
    case = make_case("random", 5, dtype=torch.float32, max_len=200)
    oracle, same, kernel = _outputs(case, dtype)
    total = case.info.total
    rel = 1e-2 if dtype == torch.float16 else 1e-4   # ~8x fp16's and ~1000x fp32's rounding
    off = kernel.clone()
    off[:total] = (kernel[:total].double() * (1 + rel)).to(dtype)
    assert not error_stat("out", off, oracle, same, total).ok
    nan = kernel.clone()
    nan[0, 0, 0] = float("nan")
    assert not error_stat("out", nan, oracle, same, total).finite
    assert total < kernel.shape[0]
    dirty = kernel.clone()
    dirty[total:] = 1
    stat = error_stat("out", dirty, oracle, same, total)
    assert not stat.padding_zero and not stat.ok
