"""Sampling parameters validate themselves; the target distribution is what the parameters say."""
import math

import pytest
import torch

from common.speculative.params import SamplingParams
from common.speculative.sampling import (PURPOSE_ACCEPT, make_generator, target_distribution,
                                         truncate_distribution)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature=-0.1"),
    ({"temperature": math.nan}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0: must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_k": -1}, "top_k=-1"),
    ({"max_tokens": 0}, "max_tokens=0: must be in \\[1, 32768\\]"),
    ({"min_p": 1.0}, "min_p=1.0"),
    ({"stop": [""]}, "stop"),
    ({"seed": -3}, "seed=-3"),
])
def test_bad_params_are_refused_with_the_field_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_greedy_is_a_point_mass_on_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    p = target_distribution(logits, SamplingParams(temperature=0))
    assert p.tolist() == [[0, 1, 0], [1, 0, 0]]


def test_top_k_and_top_p_keep_exactly_their_support():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    assert (truncate_distribution(probs, top_k=2) > 0).sum().item() == 2
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (mass before it 0.7 < 0.8) stays, the fourth not
    kept = truncate_distribution(probs, top_p=0.8)
    assert (kept > 0).tolist() == [[True, True, True, False, False]]
    assert torch.allclose(kept.sum(-1), torch.ones(1))
    assert torch.allclose(kept[0, :3], torch.tensor([0.5, 0.2, 0.15]) / 0.85)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    hot = target_distribution(logits, SamplingParams(temperature=2.0))
    cold = target_distribution(logits, SamplingParams(temperature=0.5))
    assert cold[0, 1] > torch.softmax(logits, -1)[0, 1] > hot[0, 1]


def test_streams_are_reproducible_and_distinct():
    draw = lambda seed, pos: torch.rand(4, generator=make_generator(seed, PURPOSE_ACCEPT, 0, pos)).tolist()
    assert draw(1, 5) == draw(1, 5)
    assert draw(1, 5) != draw(2, 5)
    assert draw(1, 5) != draw(1, 6)
    assert make_generator(None, PURPOSE_ACCEPT, 0, 0) is None
