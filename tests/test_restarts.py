"""Crash and restart: neurons rebuilt from their workdir never commit twice, never merge twice,
and resume training bit-exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from e2e_harness import build_subnet, domain_config
from safetensors.torch import load_file

from connito.errors import ChainError
from connito.node.miner import Miner
from connito.node.validator import Validator
from connito.protocol.commitments import CommitPayload, GlobalPayload, decode_commitment
from connito.protocol.phases import phase, phase_bounds


def _payloads(subnet, name, kind):
    hotkey = subnet.keys[name].ss58_address
    return [
        decode_commitment(c.data)
        for c in subnet.chain.commitment_history(hotkey)
        if isinstance(decode_commitment(c.data), kind)
    ]


def test_restarted_miner_does_not_commit_twice(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=1, validators=1)
    first, _ = phase_bounds(0, "commit", config.cycle)
    subnet.run_until(first)  # m0 trained and committed at the first commit block
    subnet.nodes["m0"] = Miner(subnet.nodes["m0"].ctx, progress_bars=False)  # a restart
    assert subnet.nodes["m0"].progress.commit_block == first
    _, end = phase_bounds(0, "merge", config.cycle)
    subnet.run_until(end)
    assert len(_payloads(subnet, "m0", CommitPayload)) == 1
    assert subnet.nodes["v0"].state.results[0].scores[0].accepted


def test_restarted_validator_does_not_merge_twice(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    merge_first, merge_last = phase_bounds(0, "merge", config.cycle)
    subnet.run_until(merge_first)
    lead = subnet.nodes["v0"]
    assert lead.state.results[0].decision in ("merged", "best_single")
    revision, steps = lead.global_state.revision, lead.global_state.outer.step
    subnet.nodes["v0"] = Validator(lead.ctx)  # restart after the merge was published
    subnet.run_until(merge_last)
    restarted = subnet.nodes["v0"]
    assert len(_payloads(subnet, "v0", GlobalPayload)) == 1
    assert restarted.global_state.revision == revision
    assert restarted.global_state.outer.step == steps


class _CommitFailsOnce:
    """Fault injection: the chain refuses the lead's first global commitment."""

    def __init__(self, chain):
        self._chain = chain
        self.failed = False

    def __getattr__(self, name):
        return getattr(self._chain, name)

    def commit(self, data: bytes) -> int:
        if not self.failed and isinstance(decode_commitment(data), GlobalPayload):
            self.failed = True
            raise ChainError("injected: transaction dropped")
        return self._chain.commit(data)


def test_merge_interrupted_before_its_commitment_is_published_once(tmp_path):
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=1)
    lead = subnet.nodes["v0"]
    faulty = _CommitFailsOnce(lead.ctx.chain)
    subnet.nodes["v0"] = Validator(dataclasses.replace(lead.ctx, chain=faulty))
    _, merge_last = phase_bounds(0, "merge", config.cycle)
    merge_first, _ = phase_bounds(0, "merge", config.cycle)
    subnet.run_until(merge_first)  # the first publication is dropped: the merge stays pending
    assert faulty.failed and subnet.nodes["v0"].state.results[0].decision == "pending"
    assert subnet.nodes["v0"].global_state.cycle == -1
    subnet.nodes["v0"] = Validator(subnet.nodes["v0"].ctx)  # restart, as a crashed process would
    subnet.run_until(merge_last)
    published = _payloads(subnet, "v0", GlobalPayload)
    assert [p.cycle for p in published] == [0]
    assert subnet.nodes["v0"].global_state.outer.step == 1


def test_miner_killed_mid_training_resumes_bit_exactly(tmp_path, monkeypatch):
    config = domain_config(training__inner_steps=20)
    reference = build_subnet(tmp_path / "ref", config, miners=1, validators=1)
    train_first, _ = phase_bounds(0, "train", config.cycle)
    reference.run_until(train_first)
    expected = load_file(str(tmp_path / "ref" / "nodes" / "m0" / "checkpoints" / "0" / "experts.safetensors"))

    subnet = build_subnet(tmp_path / "crash", config, miners=1, validators=1)
    miner = subnet.nodes["m0"]
    calls = {"n": 0}
    original = Miner._save_trainer

    def crash_after_first_save(self, trainer, cycle):
        original(self, trainer, cycle)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("kill -9 stand-in after 10 steps")

    monkeypatch.setattr(Miner, "_save_trainer", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        miner.tick(train_first, phase(train_first, config.cycle))
    restarted = Miner(miner.ctx, progress_bars=False)
    restarted.tick(train_first, phase(train_first, config.cycle))
    got = load_file(str(tmp_path / "crash" / "nodes" / "m0" / "checkpoints" / "0" / "experts.safetensors"))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("keep", [True, False])
def test_miner_carries_its_adamw_moments_into_the_next_cycle(tmp_path, monkeypatch, keep):
    config = domain_config(training__keep_optimizer_state=keep)
    subnet = build_subnet(tmp_path, config, miners=1, validators=1)
    taken: list[tuple[int, bool]] = []
    original = Miner._carry_moments

    def spy(self, trainer, path, metadata, cycle):
        original(self, trainer, path, metadata, cycle)
        taken.append((cycle, bool(trainer.optimizer.state)))

    monkeypatch.setattr(Miner, "_carry_moments", spy)
    subnet.run_until(phase_bounds(1, "train", config.cycle)[1])
    assert taken == [(1, keep)]
