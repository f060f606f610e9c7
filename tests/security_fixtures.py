"""Fixtures for the protocol security tests: one tiny domain, crafted commitments, submissions.

The domain (data, base model, expert selection) is built once per test module and only read
afterwards; every chain, store and node workdir lives in the test's own ``tmp_path``. The only
fake is ``FlakyChain``, which wraps a real ``LocalChain`` to inject a weight-transaction fault.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bittensor.sp_core import Keypair
from e2e_harness import Subnet, domain_config

from connito.chain.base import Commitment
from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import DomainConfig
from connito.data import DomainData, build_domain_data
from connito.errors import ChainError
from connito.hub import LocalStore
from connito.hub.base import StoreRef
from connito.ml.modeling import build_model
from connito.ml.moe import read_experts
from connito.ml.selection_record import ExpertSelection
from connito.node.context import NodeContext
from connito.node.miner import Miner
from connito.node.validator import Validator
from connito.owner.bootstrap import build_selection
from connito.protocol.checkpoint import MANIFEST_FILE, ExpertSpec, Manifest, write_checkpoint
from connito.protocol.commitments import (
    CommitPayload,
    RevealPayload,
    commit_digest,
    encode_commitment,
    short_digest,
)
from connito.protocol.merge import state_revision

__all__ = [
    "Domain",
    "Submission",
    "FlakyChain",
    "build_domain",
    "hotkey_of",
    "commit_record",
    "reveal_record",
    "make_submission",
    "perturbed",
    "build_net",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Domain:
    """A tiny domain every node of a test shares: config, data, base model folder, selection."""

    config: DomainConfig
    data: DomainData
    base_dir: Path
    selection: ExpertSelection
    global_experts: dict[str, torch.Tensor]  # the genesis global state (base model's selected experts)

    @property
    def global_revision(self) -> str:
        return state_revision(self.global_experts)

    @property
    def expected(self) -> dict[str, ExpertSpec]:
        return {k: ExpertSpec(tuple(v.shape), v.dtype) for k, v in self.global_experts.items()}


def build_domain(root: Path) -> Domain:
    """Owner bootstrap of the e2e harness's tiny domain, done once into ``root``."""
    config = domain_config()
    data = build_domain_data(config.data, cache_dir=root / "cache", model=config.model)
    model = build_model(config.model)
    model.save_pretrained(root / "base")
    selection = build_selection(config, model, data, model_revision="test-base", progress=False).sealed()
    experts = read_experts(model, selection.experts_by_layer)
    return Domain(
        config=config, data=data, base_dir=root / "base", selection=selection, global_experts=experts
    )


def hotkey_of(name: str) -> str:
    """A real, deterministic ss58 hotkey for a test name."""
    return Keypair.create_from_uri(f"//{name}").ss58_address


def commit_record(hotkey: str, block: int, *, cycle: int, digest: bytes) -> Commitment:
    """The chain record of a commit written at ``block``."""
    return Commitment(
        hotkey=hotkey, block=block, data=encode_commitment(CommitPayload(cycle=cycle, digest=digest))
    )


def reveal_record(hotkey: str, block: int, *, cycle: int, ref: StoreRef, manifest_sha: bytes) -> Commitment:
    """The chain record of a reveal (checkpoint location) written at ``block``."""
    payload = RevealPayload(
        cycle=cycle,
        store_kind=ref.kind,
        repo=ref.repo,
        revision=ref.revision,
        manifest_digest=short_digest(manifest_sha),
    )
    return Commitment(hotkey=hotkey, block=block, data=encode_commitment(payload))


@dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    """A checkpoint written and uploaded, with the digest an honest miner would commit."""

    manifest: Manifest
    ref: StoreRef
    digest: bytes  # commit_digest over the manifest's own fields
    manifest_sha: bytes  # sha256 of manifest.json, what the reveal carries (truncated)


def make_submission(
    domain: Domain,
    store: LocalStore,
    folder: Path,
    *,
    hotkey: str,
    cycle: int,
    experts: dict[str, torch.Tensor],
    global_revision: str | None = None,
    repo: str | None = None,
) -> Submission:
    """Write ``experts`` as ``hotkey``'s checkpoint for ``cycle`` and upload it."""
    manifest = write_checkpoint(
        folder,
        experts,
        kind="submission",
        domain=domain.config.name,
        model_id=domain.selection.model_id,
        model_revision=domain.selection.model_revision,
        selection_digest=domain.selection.digest,
        cycle=cycle,
        global_revision=global_revision or domain.global_revision,
        hotkey=hotkey,
    )
    ref = store.upload(folder, repo=repo or f"miners/{folder.name}")
    digest = commit_digest(
        domain=manifest.domain,
        cycle=manifest.cycle,
        global_revision=manifest.global_revision,
        hotkey=manifest.hotkey,
        tensors_sha256=manifest.tensors_sha256,
    )
    manifest_sha = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).digest()
    return Submission(manifest=manifest, ref=ref, digest=digest, manifest_sha=manifest_sha)


def perturbed(experts: dict[str, torch.Tensor], *, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """``experts`` plus seeded Gaussian noise of ``scale`` times each tensor's mean magnitude."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=generator).to(v.dtype)
        for k, v in sorted(experts.items())
    }


@dataclass
class FlakyChain:
    """A real chain whose next ``failures`` weight transactions raise ``ChainError`` (fault injection)."""

    inner: LocalChain
    failures: int = 1
    attempts: list[int] = field(default_factory=list)  # block of every set_weights call

    @property
    def hotkey(self) -> str | None:
        return self.inner.hotkey

    def set_weights(self, weights: dict[int, float], *, version_key: int = 0) -> int:
        self.attempts.append(self.inner.current_block())
        if self.failures > 0:
            self.failures -= 1
            raise ChainError(f"set_weights refused hotkey={self.inner.hotkey}: injected transaction failure")
        return self.inner.set_weights(weights, version_key=version_key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def build_net(
    tmp: Path,
    domain: Domain,
    *,
    miners: int = 1,
    validators: int = 1,
    extra: tuple[str, ...] = (),
    weights_rate_limit: int = 1,
) -> Subnet:
    """A manual-clock subnet over the shared domain: validators, honest miners, then ``extra``
    hotkeys registered but given no node (a test drives them by hand)."""
    names = [f"v{i}" for i in range(validators)] + [f"m{i}" for i in range(miners)] + list(extra)
    keys = {name: Keypair.create_from_uri(f"//{name}") for name in names}
    path = tmp / "chain.sqlite"
    LocalChain.genesis(
        path,
        netuid=0,
        seed=7,
        neurons=[
            GenesisNeuron(
                hotkey=keys[n].ss58_address,
                stake=100.0 - i if n.startswith("v") else 0.0,
                validator_permit=n.startswith("v"),
            )
            for i, n in enumerate(names)
        ],
        weights_rate_limit=weights_rate_limit,
        commitment_rate_limit=1,
    )
    store = LocalStore(tmp / "hub")
    nodes: dict[str, object] = {}
    for name in names[: validators + miners]:
        ctx = NodeContext(
            config=domain.config,
            selection=domain.selection,
            chain=LocalChain.open(path, wallet=keys[name]),
            store=store,
            hotkey=keys[name].ss58_address,
            base_dir=domain.base_dir,
            workdir=tmp / "nodes" / name,
            data=domain.data,
            device=torch.device("cpu"),
            hub_repo=f"nodes/{name}",
        )
        nodes[name] = Validator(ctx) if name.startswith("v") else Miner(ctx, progress_bars=False)
    return Subnet(
        config=domain.config,
        chain=LocalChain.open(path),
        store=store,
        base_dir=domain.base_dir,
        nodes=nodes,
        keys=keys,
    )
