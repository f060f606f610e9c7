"""The copy screen in bounded memory: sketch bounds, exact decisions, experts read again on demand."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import random_batch, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from connito.config import ScoringConfig
from connito.ml.delta_sketch import SKETCH_BLOCK, cosine_upper_bound, sketch_delta
from connito.ml.moe import read_experts
from connito.protocol.scoring import (
    Candidate,
    _screen_copies,
    cosine_similarity,
    pseudo_gradient,
    score_submissions,
)

SELECTION = {0: [1, 2], 1: [3]}


def _vector(seed: int, n: int, *, scale: float, sparsity: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = scale * torch.randn(n, generator=generator)
    values[torch.rand(n, generator=generator) < sparsity] = 0.0
    return values


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3 * SKETCH_BLOCK + 7),
    scale=st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 1e20]),
    sparsity=st.sampled_from([0.0, 0.5, 0.99]),
    noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 100.0]),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_sketch_bound_is_never_below_the_cosine(seed, n, scale, sparsity, noise, sign) -> None:
    """For independent, near-copy, copy and opposite deltas, the sketch bound is >= the cosine."""
    a = _vector(seed, n, scale=scale, sparsity=sparsity)
    b = sign * a + noise * _vector(seed + 1, n, scale=scale, sparsity=sparsity)
    if not (a.any() and b.any()):
        return
    exact = float(a.double() @ b.double()) / float(a.double().norm() * b.double().norm())
    assert cosine_upper_bound(sketch_delta(a), sketch_delta(b)) >= exact - 1e-12


def test_sketch_is_a_quarter_of_an_fp32_delta_and_bounds_tightly() -> None:
    """One byte per element; an unrelated pair is bounded far below 0.99, a copy at ~1."""
    a, b = _vector(0, 100_000, scale=1e-2, sparsity=0.0), _vector(1, 100_000, scale=1e-2, sparsity=0.0)
    sa, sb = sketch_delta(a), sketch_delta(b)
    assert sa.nbytes <= 0.26 * a.numel() * a.element_size()
    assert cosine_upper_bound(sa, sb) < 0.05
    assert cosine_upper_bound(sa, sa) == pytest.approx(1.0, abs=0.02)


def test_sketches_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        cosine_upper_bound(
            sketch_delta(torch.ones(SKETCH_BLOCK + 1)), sketch_delta(torch.ones(3 * SKETCH_BLOCK))
        )


def _exhaustive_screen(candidates, global_state, threshold):
    """The screen comparing every pair's full fp32 pseudo-gradients (the reference)."""
    kept, rejected = [], {}
    for candidate in sorted(candidates, key=lambda c: (c.commit_block, c.hotkey)):
        delta = pseudo_gradient(global_state, candidate.experts())
        twin = next((o for o, d in kept if cosine_similarity(delta, d) >= threshold), None)
        if twin is not None:
            rejected[candidate.hotkey] = twin.hotkey
        else:
            kept.append((candidate, delta))
    return [c.hotkey for c, _ in kept], rejected


def _states(global_state, seed: int):
    """Independent deltas, near-copies at several noise levels, a scaled copy and an opposite one."""
    generator = torch.Generator().manual_seed(seed)

    def noise(std: float) -> dict[str, torch.Tensor]:
        return {k: std * torch.randn(v.shape, generator=generator) for k, v in global_state.items()}

    bases = [noise(1e-2) for _ in range(4)]
    states = {f"honest-{i}": {k: global_state[k] + d[k] for k in d} for i, d in enumerate(bases)}
    for level in (1e-4, 1e-3, 1.4e-3, 2e-3, 5e-3):  # cosine ~0.9999 down to ~0.9: both sides of 0.99
        extra = noise(level)
        states[f"near-{level}"] = {k: global_state[k] + bases[0][k] + extra[k] for k in global_state}
    states["scaled"] = {k: global_state[k] + 3.0 * bases[1][k] for k in global_state}
    states["opposite"] = {k: global_state[k] - bases[2][k] for k in global_state}
    return states


class _Loads:
    """Candidates whose experts are read through ``load``, counting each read."""

    def __init__(self, states):
        self.states, self.count = states, Counter()

    def candidate(self, hotkey: str, block: int) -> Candidate:
        def load() -> dict[str, torch.Tensor]:
            self.count[hotkey] += 1
            return {k: v.clone() for k, v in self.states[hotkey].items()}

        return Candidate(hotkey=hotkey, uid=block, commit_block=block, tensors_sha256=hotkey, load=load)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screen_decides_exactly_as_comparing_every_pair(seed: int) -> None:
    """Same kept list and same twins as the exhaustive fp32 screen; only near-copies are read again."""
    global_state = read_experts(tiny_model("qwen3_moe"), SELECTION)
    loads = _Loads(_states(global_state, seed))
    candidates = [loads.candidate(h, block) for block, h in enumerate(loads.states)]
    kept_ref, twins_ref = _exhaustive_screen(candidates, global_state, 0.99)
    loads.count.clear()
    kept, rejected = _screen_copies(candidates, global_state, 0.99, None)
    assert [c.hotkey for c, _ in kept] == kept_ref
    assert {s.hotkey: s.detail.rsplit("=", 1)[1] for s in rejected} == twins_ref
    assert set(twins_ref) >= {"near-0.0001", "near-0.001", "scaled"}, "the fixture has copies to catch"
    assert "near-0.005" in kept_ref and "opposite" in kept_ref, "and near misses to keep"
    # every candidate is read once for its delta; a kept one again only when a later one nearly copies it
    assert set(loads.count) == set(loads.states)
    assert all(n == 1 for h, n in loads.count.items() if h not in ("honest-0", "honest-1"))


def test_candidates_read_on_demand_score_as_held_ones() -> None:
    """score_submissions gives identical scores whether the experts are held or read by ``load``."""
    model = tiny_model("qwen3_moe")
    global_state = read_experts(model, SELECTION)
    states = _states(global_state, 0)
    domain = [random_batch(2, 16, seed=s) for s in range(3)]
    general = [random_batch(2, 16, seed=100 + s) for s in range(2)]
    config = ScoringConfig(general_tolerance=10.0)
    held = [
        Candidate(hotkey=h, uid=b, commit_block=b, tensors_sha256=h, state=s)
        for b, (h, s) in enumerate(states.items())
    ]
    loads = _Loads(states)
    lazy = [loads.candidate(h, b) for b, h in enumerate(states)]
    kwargs = {"domain_batches": domain, "general_batches": general, "config": config}
    expected = score_submissions(model, global_state, held, **kwargs)
    assert score_submissions(model, global_state, lazy, **kwargs) == expected
    restored = read_experts(model, SELECTION)
    assert all(torch.equal(restored[k], v) for k, v in global_state.items())
    losses = [s.domain_loss for s in expected[1] if s.domain_loss is not None]
    assert losses and all(math.isfinite(x) for x in losses)


def test_candidate_needs_exactly_one_of_state_and_load() -> None:
    with pytest.raises(ValueError, match="exactly one of state and load"):
        Candidate(hotkey="h", uid=0, commit_block=0, tensors_sha256="d")
    with pytest.raises(ValueError, match="exactly one of state and load"):
        Candidate(hotkey="h", uid=0, commit_block=0, tensors_sha256="d", state={}, load=dict)
