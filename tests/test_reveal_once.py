"""The reveal uploads its checkpoint once per cycle and retries only the chain write.

A miner whose reveal commitment fails (rate limit, a dropped websocket) used to upload the same
payload to the Hub again at every block until the chain write landed: one Hub commit per block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from e2e_harness import build_subnet, domain_config

from connito.errors import ChainError
from connito.node.miner import Miner, MinerProgress
from connito.protocol.commitments import RevealPayload, decode_commitment


class _CountingStore:
    """The real store, counting uploads."""

    def __init__(self, inner) -> None:
        self.inner, self.uploads = inner, 0

    def upload(self, *args, **kwargs):
        self.uploads += 1
        return self.inner.upload(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _RevealRefused:
    """The real chain, refusing the first ``failures`` reveal commitments (fault injection)."""

    def __init__(self, inner, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def commit(self, data: bytes) -> int:
        if self.failures > 0 and isinstance(decode_commitment(data), RevealPayload):
            self.failures -= 1
            raise ChainError("commit refused: injected websocket drop")
        return self.inner.commit(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_reveal_retries_only_the_chain_write(tmp_path: Path) -> None:
    config = domain_config(cycle__reveal_blocks=5)
    subnet = build_subnet(tmp_path, config, miners=1, validators=1)
    miner = subnet.nodes["m0"]
    assert isinstance(miner, Miner)
    store = _CountingStore(miner.ctx.store)
    chain = _RevealRefused(miner.ctx.chain, failures=3)
    subnet.nodes["m0"] = Miner(dataclasses.replace(miner.ctx, store=store, chain=chain), progress_bars=False)
    cycle = config.cycle
    subnet.run_until(cycle.train_blocks + cycle.commit_blocks + cycle.reveal_blocks - 1)

    progress = MinerProgress.model_validate_json(
        (tmp_path / "nodes" / "m0" / "miner_progress.json").read_bytes()
    )
    assert chain.failures == 0 and progress.reveal_block is not None
    assert store.uploads == 1
    assert progress.uploaded is not None and progress.uploaded.repo == "nodes/m0"
