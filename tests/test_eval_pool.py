"""Scoring on several model replicas: the same scores as one model, work spread round-robin."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_batch, tiny_model

from connito.config import ScoringConfig
from connito.ml.eval_pool import EvalPool
from connito.ml.moe import read_experts
from connito.protocol.scoring import Candidate, score_submissions

SELECTION = {0: [1, 5], 1: [3]}
CONFIG = ScoringConfig(eval_batches=3, eval_batch_size=2, general_batches=2, general_tolerance=0.5)


def _candidates(global_state: dict[str, torch.Tensor], count: int) -> list[Candidate]:
    """Seeded perturbations of the global experts, of growing size (some help, some hurt)."""
    candidates = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        scale = 0.02 * (index + 1)
        state = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in global_state.items()}
        candidates.append(
            Candidate(
                hotkey=f"h{index}",
                uid=index,
                commit_block=10 + index,
                tensors_sha256=f"{index:064x}",
                state=state,
            )
        )
    return candidates


def _score(model, global_state, candidates, pool):
    domain = [random_batch(seed=100 + i) for i in range(CONFIG.eval_batches)]
    general = [random_batch(seed=200 + i) for i in range(CONFIG.general_batches)]
    return score_submissions(
        model,
        global_state,
        candidates,
        domain_batches=domain,
        general_batches=general,
        config=CONFIG,
        pool=pool,
    )


def test_two_replicas_score_exactly_like_one_model():
    """Two replicas on two "devices" (both cpu) give bit-identical scores to the model alone, and
    every replica holds the global experts again afterwards."""
    model = tiny_model("qwen3_moe")
    global_state = read_experts(model, SELECTION)
    candidates = _candidates(global_state, 5)
    alone = _score(model, global_state, candidates, None)
    pool = EvalPool.replicate(model, ["cpu", "cpu"])
    assert pool.replicas[0] is model and pool.replicas[1] is not model
    pooled = _score(model, global_state, candidates, pool)
    assert pooled == alone  # frozen dataclasses: every loss, utility and verdict equal
    assert {s.accepted for s in alone[1]} == {True, False}, "a mix of verdicts makes the check meaningful"
    for replica in pool.replicas:
        for key, tensor in read_experts(replica, SELECTION).items():
            assert torch.equal(tensor, global_state[key]), key


def test_map_sends_item_i_to_replica_i_mod_k_in_one_thread_each():
    replicas = [torch.nn.Linear(1, 1) for _ in range(3)]
    pool = EvalPool(replicas)
    seen: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def fn(replica, item):
        with lock:
            seen.append((replicas.index(replica), item, threading.current_thread().name))
        return item * 10

    assert pool.map(fn, list(range(7))) == [i * 10 for i in range(7)]  # results in item order
    assert sorted((r, i) for r, i, _ in seen) == sorted((i % 3, i) for i in range(7))
    threads = {r: {name for rr, _, name in seen if rr == r} for r in range(3)}
    assert all(len(names) == 1 for names in threads.values())
    assert len(set().union(*threads.values())) == 3


def test_a_failing_item_raises_after_the_other_replicas_finish():
    pool = EvalPool([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
    done: list[int] = []

    def fn(_replica, item):
        if item == 0:
            raise RuntimeError("boom")
        done.append(item)
        return item

    with pytest.raises(RuntimeError, match="boom"):
        pool.map(fn, [0, 1, 2, 3])
    assert sorted(done) == [1, 3]


def test_replicate_loads_other_devices_and_never_shares_weights():
    model = tiny_model("olmoe")
    loaded: list[torch.device] = []

    def load(device):
        loaded.append(device)
        return tiny_model("olmoe").to(device)

    pool = EvalPool.replicate(model, ["cpu", "cpu", "cpu"], load=load)
    assert pool.replicas[0] is model and loaded == [torch.device("cpu")] * 2
    pointers = [{p.data_ptr() for p in replica.parameters()} for replica in pool.replicas]
    assert not (pointers[0] & pointers[1]) and not (pointers[1] & pointers[2])
    assert pool.devices == [torch.device("cpu")] * 3


def test_a_validator_with_two_eval_devices_records_the_same_cycle_as_one_without(tmp_path):
    """In-process subnet: v1 scores on two replicas, v0 on its model alone; their rows agree exactly."""
    from e2e_harness import build_subnet, domain_config

    from connito.protocol.phases import phase_bounds

    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=3, validators=2)
    subnet.nodes["v1"].eval_devices = ("cpu", "cpu")
    _, end = phase_bounds(0, "evaluate", config.cycle)
    subnet.run_until(end)
    lead, pooled = subnet.nodes["v0"], subnet.nodes["v1"]
    assert pooled._pool is not None and len(pooled._pool.replicas) == 2
    rows = [[row.model_dump() for row in node.state.results[0].scores] for node in (lead, pooled)]
    assert len(rows[0]) == 3 and any(row["accepted"] for row in rows[0])
    assert rows[0] == rows[1]
