"""The trace generator of bench/swift_diffusion_trace.py: Poisson arrivals, Zipf popularity, the add-on mix."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from swift_diffusion_trace import LORA_COUNTS, make_trace, zipf_pmf  # noqa: E402

LORAS = [f"lora{i:02d}" for i in range(16)]
CONTROLNETS = ["edges", "edges-b"]


@pytest.fixture(scope="module")
def trace():
    return make_trace(20000, 2.5, LORAS, CONTROLNETS, zipf_s=1.0, controlnet_p=0.5, seed=3)


def test_arrivals_are_poisson_at_the_rate(trace):
    at = np.array([r.at for r in trace])
    gaps = np.diff(at, prepend=0.0)
    assert (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 2.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: coefficient of variation 1


def test_lora_popularity_follows_zipf(trace):
    pmf = zipf_pmf(16, 1.0)
    assert pmf.sum() == pytest.approx(1.0) and pmf[0] / pmf[1] == pytest.approx(2.0)
    singles = Counter(r.loras[0] for r in trace if len(r.loras) == 1)
    n = sum(singles.values())
    freq = np.array([singles[name] / n for name in LORAS])
    assert freq == pytest.approx(pmf, abs=0.012)
    every = Counter(name for r in trace for name in r.loras)
    counts = [every[name] for name in LORAS]
    assert counts[:6] == sorted(counts[:6], reverse=True) and counts[0] > 5 * counts[-1]


def test_mix_proportions(trace):
    assert all(len(set(r.loras)) == len(r.loras) <= 2 for r in trace)
    shares = np.bincount([len(r.loras) for r in trace], minlength=3) / len(trace)
    assert shares == pytest.approx(LORA_COUNTS, abs=0.015)
    cns = Counter(r.controlnet for r in trace)
    assert cns[None] / len(trace) == pytest.approx(0.5, abs=0.015)
    assert cns["edges"] / len(trace) == pytest.approx(0.25, abs=0.015)
    assert set(cns) == {None, *CONTROLNETS}


def test_seeded_and_the_same_requests_at_every_rate():
    one = make_trace(50, 1.0, LORAS, CONTROLNETS, seed=7)
    assert one == make_trace(50, 1.0, LORAS, CONTROLNETS, seed=7)
    assert one != make_trace(50, 1.0, LORAS, CONTROLNETS, seed=8)
    faster = make_trace(50, 4.0, LORAS, CONTROLNETS, seed=7)
    assert [(r.loras, r.controlnet, r.seed) for r in faster] == [(r.loras, r.controlnet, r.seed) for r in one]
    assert [r.at * 4 for r in faster] == pytest.approx([r.at for r in one])


def test_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError):
        make_trace(10, 0.0, LORAS, CONTROLNETS)
