"""The DiLoCo outer optimizer, checked against oracles: averaging, hand-computed Nesterov, torch SGD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connito.errors import InvalidSubmission, StateError
from connito.ml.moe import expert_key
from connito.ml.outer import OuterOptimizer, clip_pseudo_gradients

KEYS = [expert_key(0, 1, "gate_proj"), expert_key(0, 1, "down_proj"), expert_key(1, 4, "up_proj")]
SHAPES = {KEYS[0]: (4, 6), KEYS[1]: (6, 4), KEYS[2]: (4, 6)}


def _state(seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: (scale * torch.randn(shape, generator=generator)).to(dtype) for key, shape in SHAPES.items()}


def _shifted(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A local state whose pseudo-gradient against ``state`` is ``delta``."""
    return {key: state[key] - delta[key] for key in state}


def _dyadic(seed: int) -> dict[str, torch.Tensor]:
    """Small multiples of 1/8: every sum and halving below is exact in fp32."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randint(-64, 64, shape, generator=generator).float() / 8 for key, shape in SHAPES.items()
    }


def test_lr_one_momentum_zero_is_exact_weighted_average():
    """The DiLoCo oracle: lr 1, momentum 0 gives exactly sum_i w_i * local_i."""
    global_state = _dyadic(0)
    locals_ = [_dyadic(1), _dyadic(2), _dyadic(3), _dyadic(4)]
    weights = [1.0, 1.0, 2.0, 4.0]  # normalised to 1/8, 1/8, 1/4, 1/2: dyadic, so exact
    merged = OuterOptimizer(global_state, lr=1.0, momentum=0.0).step(locals_, weights)
    for key in KEYS:
        expected = sum(w / 8 * local[key] for w, local in zip(weights, locals_, strict=True))
        assert torch.equal(merged[key], expected)


def test_lr_one_momentum_zero_matches_uniform_average_of_random_states():
    global_state = _state(0)
    locals_ = [_state(seed) for seed in (1, 2, 3)]
    merged = OuterOptimizer(global_state, lr=1.0, momentum=0.0, nesterov=False).step(locals_)
    for key in KEYS:
        expected = torch.stack([local[key].double() for local in locals_]).mean(0)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)


def test_two_nesterov_steps_match_hand_computation():
    """Constant g: step 1 moves 0.7 * 1.9 g = 1.33 g; step 2 adds 0.7 * 2.71 g, total 3.227 g."""
    global_state = {key: torch.zeros(shape) for key, shape in SHAPES.items()}
    g = {key: torch.full(shape, 0.5) for key, shape in SHAPES.items()}
    optimizer = OuterOptimizer(global_state)  # lr 0.7, momentum 0.9, nesterov
    first = optimizer.step([_shifted(optimizer.global_state(), g)])
    second = optimizer.step([_shifted(optimizer.global_state(), g)])
    for key in KEYS:
        torch.testing.assert_close(first[key], -1.33 * g[key], rtol=1e-6, atol=0)
        torch.testing.assert_close(second[key], -3.227 * g[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("nesterov", [True, False])
def test_steps_equal_torch_sgd_bit_for_bit(nesterov):
    """The visible update math is torch.optim.SGD's, to the bit, over several steps."""
    global_state = _state(0)
    params = {key: torch.nn.Parameter(t.clone()) for key, t in global_state.items()}
    reference = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=nesterov, foreach=False)
    optimizer = OuterOptimizer(global_state, lr=0.7, momentum=0.9, nesterov=nesterov)
    for step in range(3):
        local = _shifted(optimizer.global_state(), _state(10 + step, scale=0.01))
        for key, param in params.items():
            param.grad = param.detach() - local[key]  # the same pseudo-gradient, global - local
        reference.step()
        merged = optimizer.step([local])
        for key in KEYS:
            assert torch.equal(merged[key], params[key].detach())


def test_master_keeps_updates_below_bf16_resolution():
    """Small updates accumulate in the fp32 master even when each rounds away in bf16."""
    global_state = {key: torch.ones(shape, dtype=torch.bfloat16) for key, shape in SHAPES.items()}
    optimizer = OuterOptimizer(global_state, lr=1.0, momentum=0.0)
    tiny = {key: torch.full(shape, 2.0**-10) for key, shape in SHAPES.items()}  # bf16 spacing at 1 is 2**-7
    for _ in range(16):
        merged = optimizer.step([_shifted({k: v.float() for k, v in optimizer.global_state().items()}, tiny)])
    for key in KEYS:
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], torch.full(SHAPES[key], 1.0 - 16 * 2.0**-10, dtype=torch.bfloat16))


def test_momentum_survives_save_and_load(tmp_path):
    """Continuing after a reload gives the same bits as continuing without one."""
    global_state = _state(0, dtype=torch.bfloat16)
    submissions = [
        [_state(seed, dtype=torch.bfloat16) for seed in (cycle * 3 + 1, cycle * 3 + 2)] for cycle in range(4)
    ]
    straight = OuterOptimizer(global_state)
    for batch in submissions:
        final = straight.step(batch, [2.0, 1.0])
    interrupted = OuterOptimizer(global_state)
    for batch in submissions[:2]:
        interrupted.step(batch, [2.0, 1.0])
    interrupted.save(tmp_path / "outer.safetensors")
    resumed = OuterOptimizer(interrupted.global_state())
    resumed.load(tmp_path / "outer.safetensors")
    assert resumed.step_count == 2
    for batch in submissions[2:]:
        resumed_final = resumed.step(batch, [2.0, 1.0])
    for key in KEYS:
        assert resumed_final[key].dtype == torch.bfloat16
        assert torch.equal(resumed_final[key], final[key])
    assert all(torch.equal(resumed.state_dict().momentum[k], straight.state_dict().momentum[k]) for k in KEYS)


def test_load_refuses_state_for_other_keys(tmp_path):
    OuterOptimizer(_state(0)).save(tmp_path / "outer.safetensors")
    other = OuterOptimizer({KEYS[0]: torch.zeros(SHAPES[KEYS[0]])})
    with pytest.raises(StateError, match="keys differ"):
        other.load(tmp_path / "outer.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StateError, match="garbage.safetensors"):
        other.load(tmp_path / "garbage.safetensors")


def test_clipping_bounds_a_norm_poisoned_submission():
    """A 1000x pseudo-gradient moves the global no further than clip_norm x the median norm."""
    global_state = _state(0)
    honest = [_state(seed, scale=0.01) for seed in (1, 2, 3)]
    poisoned = {key: 1000 * t for key, t in _state(4, scale=0.01).items()}
    deltas = [*honest, poisoned]

    def update_norm(clip_norm):
        optimizer = OuterOptimizer(global_state, lr=1.0, momentum=0.0)
        merged = optimizer.step([_shifted(global_state, d) for d in deltas], clip_norm=clip_norm)
        return torch.sqrt(sum(((global_state[k] - merged[k]) ** 2).sum() for k in KEYS)).item()

    norms = sorted(torch.sqrt(sum((d[k].double() ** 2).sum() for k in KEYS)).item() for d in deltas)
    lower_median = norms[(len(norms) - 1) // 2]
    assert update_norm(None) > 100 * lower_median
    assert update_norm(1.0) <= 1.0 * lower_median * (1 + 1e-5)


def test_clipping_leaves_submissions_within_the_bound_untouched():
    deltas = [_state(1, scale=0.01), _state(2, scale=0.01)]
    clipped = clip_pseudo_gradients(deltas, clip_norm=10.0)
    assert all(torch.equal(c[k], d[k]) for c, d in zip(clipped, deltas, strict=True) for k in KEYS)


def test_weights_are_respected_and_normalised():
    global_state = _dyadic(0)
    a, b = _dyadic(1), _dyadic(2)
    only_a = OuterOptimizer(global_state, lr=1.0, momentum=0.0).step([a, b], [1.0, 0.0])
    three_to_one = OuterOptimizer(global_state, lr=1.0, momentum=0.0).step([a, b], [3.0, 1.0])
    scaled = OuterOptimizer(global_state, lr=1.0, momentum=0.0).step([a, b], [6.0, 2.0])
    for key in KEYS:
        assert torch.equal(only_a[key], a[key])
        assert torch.equal(three_to_one[key], 0.75 * a[key] + 0.25 * b[key])
        assert torch.equal(scaled[key], three_to_one[key])


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_bad_weights_are_refused(weights):
    optimizer = OuterOptimizer(_state(0))
    with pytest.raises(ValueError, match="weights"):
        optimizer.step([_state(1), _state(2)], weights)


def test_submission_with_other_keys_or_shapes_is_refused_without_state_change():
    optimizer = OuterOptimizer(_state(0))
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match="keys differ"):
        optimizer.step([{KEYS[0]: torch.zeros(SHAPES[KEYS[0]])}])
    with pytest.raises(ValueError, match="shape"):
        optimizer.step([{key: torch.zeros(2, 2) for key in KEYS}])
    after = optimizer.state_dict()
    assert after.step == before.step == 0
    assert all(torch.equal(after.master[k], before.master[k]) for k in KEYS)


def test_overflowing_merge_is_refused_without_state_change():
    """Finite but absurd submissions must not leave an Inf in the master or the momentum."""
    huge = torch.finfo(torch.float32).max
    optimizer = OuterOptimizer({key: torch.full(shape, huge / 2) for key, shape in SHAPES.items()})
    before = optimizer.state_dict()
    with pytest.raises(InvalidSubmission, match="non_finite"):  # global - local overflows
        optimizer.step([{key: torch.full(shape, -huge) for key, shape in SHAPES.items()}])
    with pytest.raises(InvalidSubmission, match="non_finite"):  # master - lr * 1.9 g overflows
        optimizer.step([{key: torch.full(shape, -huge / 2) for key, shape in SHAPES.items()}])
    after = optimizer.state_dict()
    assert after.step == 0
    assert all(torch.equal(after.master[k], before.master[k]) for k in KEYS)
    assert all(torch.equal(after.momentum[k], before.momentum[k]) for k in KEYS)


def test_step_is_deterministic():
    submissions = [_state(1), _state(2), _state(3)]
    runs = [OuterOptimizer(_state(0)).step(submissions, [0.5, 0.3, 0.2], clip_norm=1.5) for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in KEYS)


def test_untouched_keys_never_leave_the_optimizer():
    """The optimizer returns exactly the global keys, in their original dtype."""
    global_state = _state(0, dtype=torch.bfloat16)
    merged = OuterOptimizer(global_state).step([_state(1, dtype=torch.bfloat16)])
    assert sorted(merged) == sorted(KEYS) and all(t.dtype == torch.bfloat16 for t in merged.values())


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-256, 256), min_size=3, max_size=3),
    weights=st.lists(st.sampled_from([1.0, 2.0, 4.0]), min_size=3, max_size=3).filter(
        lambda w: sum(w) in (4, 8)
    ),
)
def test_averaging_oracle_holds_for_exact_inputs(values, weights):
    """For any dyadic inputs and power-of-two weight sums, lr 1 / momentum 0 is the exact average."""
    key = KEYS[0]
    global_state = {key: torch.full((2, 2), 1.5)}
    locals_ = [{key: torch.full((2, 2), v / 4)} for v in values]
    merged = OuterOptimizer(global_state, lr=1.0, momentum=0.0).step(locals_, weights)
    expected = sum(w / sum(weights) * (v / 4) for w, v in zip(weights, values, strict=True))
    assert torch.equal(merged[key], torch.full((2, 2), expected))
