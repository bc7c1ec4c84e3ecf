"""Generation arguments: out-of-range values are a ValueError naming the argument."""

import pytest
import torch

from prefixlm.model import PrefixLM, generate
from prefixlm.model.config import preset_config


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(temperature=-0.5), "temperature must be finite and >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite and >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 1"),
])
def test_out_of_range_sampling_arguments_are_value_errors(kwargs, match):
    """Guards torch's RuntimeErrors from deep inside sampling (NaN temperature: "probability
    tensor contains either inf, nan"; top_p=0: an empty nucleus) and an empty answer for
    max_new_tokens=0: each is refused up front, naming the argument and its range."""
    torch.manual_seed(0)
    model = PrefixLM(preset_config("tiny", vocab_size=64, hidden=32, heads=2, layers=1,
                                   ffn_hidden=64), backend="sdpa").eval()
    with pytest.raises(ValueError, match=match):
        generate(model, [1, 2, 3], **kwargs)
    assert len(generate(model, [1, 2, 3], max_new_tokens=2, temperature=0.5, top_p=1.0)) == 2
