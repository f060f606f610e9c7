"""Hostile payloads, norm poisoning, seed prediction and data leaks, through the validator's real path.

Miners here play the protocol by hand (commit on a ``LocalChain``, upload to a ``LocalStore`` or a
loopback Hub, reveal) so that they can submit anything at all; the validator is the real
``Validator``. Every hostile submission must be rejected with its reason, and the validator's
model and global state must be bit-identical afterwards. The rows of ``docs/security.md`` point at
these tests (see ``docs/security.md``).

The base model is the tiny e2e Qwen3-MoE, briefly pretrained so that losses mean something (on a
random-init model a function-preserving rescale of the experts happens to *lower* the loss, so
the norm-poisoning attack would not even hurt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from bittensor.sp_core import Keypair
from conftest import make_selection
from e2e_harness import domain_config
from hub_server import HubServer, running_hub

from connito.chain.local import LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.config import DataConfig, DataSource, DomainConfig, MergeConfig, TokenizerConfig
from connito.data import (
    DomainData,
    build_domain_data,
    generate_math_documents,
    split_documents,
    tokenize_documents,
)
from connito.errors import ChainError, InvalidSubmission, StoreError
from connito.hub import CHECKPOINT_FILES, LocalStore, StoreRef
from connito.hub.hf import HfHubStore
from connito.ml.modeling import batch_losses, build_model, load_model
from connito.ml.moe import moe_layers, read_experts, write_experts
from connito.ml.selection_record import ExpertSelection, save_selection
from connito.node.context import NodeContext
from connito.node.validator import Validator
from connito.protocol.checkpoint import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    ExpertSpec,
    Manifest,
    tensors_digest,
    write_checkpoint,
)
from connito.protocol.commitments import (
    CommitPayload,
    RevealPayload,
    commit_digest,
    encode_commitment,
    eval_seed,
    short_digest,
)
from connito.protocol.merge import apply_merge, initial_outer_state
from connito.protocol.phases import commit_deadline, phase_bounds, seed_block
from connito.protocol.scoring import Candidate, pseudo_gradient, score_submissions
from connito.protocol.strict_loader import load_checkpoint, verify_checkpoint_cli
from connito.protocol.submissions import Observation, fetch_and_verify

PAYLOAD_CAP = 160 * 1024  # honest checkpoint ~50 KB; the full embedding (64 KB) still fits
MANIFEST_CAP = 4096
SELECTED = {0: (2, 4), 1: (0, 1)}
POISON_SCALE = 1000.0  # norm poisoning: the pseudo-gradient is ~10**3-10**4 x the median norm
PRETRAIN_STEPS = 20  # enough for the loss to mean something (6.2 -> ~5), cheap on 2 cores
ROUTER_KEY = "model.layers.0.mlp.gate.weight"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the world: config, data, a briefly pretrained base model, a selection ---------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class World:
    """What every test here shares; built once per module (the pretraining costs seconds)."""

    config: DomainConfig
    data: DomainData
    base_dir: Path
    selection: ExpertSelection
    genesis: dict[str, torch.Tensor]  # the base model's selected experts = the genesis global
    honest_a: dict[str, torch.Tensor]  # layer-0 experts trained a few steps
    honest_b: dict[str, torch.Tensor]  # layer-1 experts trained a few steps (orthogonal to a)

    @property
    def expected(self) -> dict[str, ExpertSpec]:
        return {key: ExpertSpec(tuple(t.shape), t.dtype) for key, t in self.genesis.items()}

    @property
    def genesis_revision(self) -> str:
        return tensors_digest(self.genesis)


def _next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _pretrain(model: torch.nn.Module, data: DomainData, steps: int) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = data.mixture_loader(8, seed=0)
    model.train()
    for _ in range(steps):
        loss = _next_token_loss(model, next(loader))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)


def _trained_experts(base_dir: Path, world_config: DomainConfig, data: DomainData, layer: int, seed: int):
    """The selected experts after a few SGD steps on one layer's experts (the others untouched)."""
    model = load_model(base_dir, world_config.model)
    layers = [m for m in moe_layers(model) if m.index == layer]
    params = [p for m in layers for p in (m.experts.gate_up_proj, m.experts.down_proj)]
    loader = data.train_loader(0, 1, batch_size=8, seed=seed)
    for p in params:
        p.requires_grad_(True)
    model.train()
    for _ in range(3):
        grads = torch.autograd.grad(_next_token_loss(model, next(loader)), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 2.0 * g
    trained = read_experts(model.eval(), {k: list(v) for k, v in SELECTED.items()})
    genesis = read_experts(
        load_model(base_dir, world_config.model), {k: list(v) for k, v in SELECTED.items()}
    )
    return {key: trained[key] if f".layers.{layer}." in key else genesis[key] for key in genesis}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    config = domain_config(  # payload checks only: the "honest" experts here trained on no assignment
        scoring__max_payload_bytes=PAYLOAD_CAP,
        scoring__max_manifest_bytes=MANIFEST_CAP,
        scoring__own_work_margin=None,
        merge__top_n=3,
    )
    data = build_domain_data(config.data, cache_dir=root / "cache", model=config.model)
    model = build_model(config.model)
    _pretrain(model, data, steps=PRETRAIN_STEPS)
    model.save_pretrained(root / "base")
    selection = make_selection(
        SELECTED,
        domain=config.name,
        model_id=config.model.name,
        model_revision="test-base",
        probe_tokens=0,
        score=0.125,
    )
    return World(
        config=config,
        data=data,
        base_dir=root / "base",
        selection=selection,
        genesis=read_experts(model, {k: list(v) for k, v in SELECTED.items()}),
        honest_a=_trained_experts(root / "base", config, data, layer=0, seed=1),
        honest_b=_trained_experts(root / "base", config, data, layer=1, seed=2),
    )


def _model_digest(model: torch.nn.Module) -> str:
    """Digest of the full model state: every parameter and buffer, bit for bit."""
    return tensors_digest({**dict(model.named_parameters()), **dict(model.named_buffers())})


def _heldout_loss(world: World, experts: dict[str, torch.Tensor], seed: int) -> float:
    """Held-out loss of ``experts`` in a fresh base model on the cycle's seeded sample (independent of the validator)."""
    model = load_model(world.base_dir, world.config.model)
    write_experts(model, experts)
    scoring = world.config.scoring
    losses = batch_losses(
        model, world.data.heldout_sample(seed, scoring.eval_batches, scoring.eval_batch_size)
    )
    return sum(losses) / len(losses)


def _rescaled(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The same function with a ``scale``-times larger parametrisation: up * s, down / s in layer 0.

    SwiGLU is linear in up_proj and down_proj, so down(silu(gate x) * s up x) / s is unchanged: the
    loss stays the same while the pseudo-gradient norm grows ~``scale``-fold.
    """
    out = {}
    for key, tensor in state.items():
        if ".layers.0." in key and key.endswith("up_proj.weight"):
            out[key] = tensor * scale
        elif ".layers.0." in key and key.endswith("down_proj.weight"):
            out[key] = tensor / scale
        else:
            out[key] = tensor.clone()
    return out


# --- a subnet with hand-played miners ---------------------------------------------------------


@dataclass
class Subnet:
    """A LocalChain ledger, a LocalStore and real validators; miners are played by the test."""

    world: World
    ledger: Path
    store: LocalStore
    keys: dict[str, Keypair]
    validators: dict[str, Validator]

    def chain(self, name: str | None = None) -> LocalChain:
        return LocalChain.open(self.ledger, wallet=self.keys[name] if name else None)

    def hotkey(self, name: str) -> str:
        return self.keys[name].ss58_address

    def advance_to(self, block: int) -> None:
        chain = self.chain()
        chain.advance_blocks(block - chain.current_block())
        for validator in self.validators.values():
            validator.observe()


def _subnet(
    world: World, root: Path, miners: list[str], *, validators=("v0",), seed: int = 7, config=None
) -> Subnet:
    names = list(validators) + miners
    keys = {name: Keypair.create_from_uri(f"//{name}") for name in names}
    ledger = root / "chain.sqlite"
    LocalChain.genesis(
        ledger,
        netuid=0,
        seed=seed,
        neurons=[
            GenesisNeuron(
                hotkey=keys[n].ss58_address,
                stake=100.0 - i if n in validators else 0.0,
                validator_permit=n in validators,
            )
            for i, n in enumerate(names)
        ],
        weights_rate_limit=1,
        commitment_rate_limit=1,
    )
    store = LocalStore(root / "hub")
    nodes = {}
    for name in validators:
        ctx = NodeContext(
            config=config or world.config,
            selection=world.selection,
            chain=LocalChain.open(ledger, wallet=keys[name]),
            store=store,
            hotkey=keys[name].ss58_address,
            base_dir=world.base_dir,
            workdir=root / "nodes" / name,
            data=world.data,
            device=torch.device("cpu"),
            hub_repo=f"nodes/{name}",
        )
        nodes[name] = Validator(ctx)
    return Subnet(world=world, ledger=ledger, store=store, keys=keys, validators=nodes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Play:
    """What one hand-played miner submits for cycle 0."""

    folder: Path
    commit: bytes  # the 32-byte commit digest
    files: tuple[str, ...] = CHECKPOINT_FILES
    reveal: bytes | None = None  # raw reveal bytes instead of an honest reveal of the upload


def _manifest_fields(world: World, hotkey: str, **overrides) -> dict:
    fields = dict(
        kind="submission",
        domain=world.config.name,
        model_id=world.selection.model_id,
        model_revision=world.selection.model_revision,
        selection_digest=world.selection.digest,
        cycle=0,
        global_revision=world.genesis_revision,
        hotkey=hotkey,
    )
    fields.update(overrides)
    return fields


def _commit_for(world: World, hotkey: str, tensors_sha256: str, **overrides) -> bytes:
    fields = _manifest_fields(world, hotkey, **overrides)
    return commit_digest(
        domain=fields["domain"],
        cycle=fields["cycle"],
        global_revision=fields["global_revision"],
        hotkey=hotkey,
        tensors_sha256=tensors_sha256,
    )


def _written_play(
    world: World, folder: Path, hotkey: str, state: dict[str, torch.Tensor], **overrides
) -> Play:
    """A checkpoint written by connito's own writer, committed with the digest of its manifest."""
    manifest = write_checkpoint(folder, state, **_manifest_fields(world, hotkey, **overrides))
    return Play(folder=folder, commit=_commit_for(world, hotkey, manifest.tensors_sha256, **overrides))


def _raw_play(world: World, folder: Path, hotkey: str, tensors: dict[str, torch.Tensor]) -> Play:
    """A checkpoint written around the writer's checks, with a manifest that matches its tensors."""
    folder.mkdir(parents=True)
    safetensors.torch.save_file(tensors, str(folder / EXPERTS_FILE))
    digest = tensors_digest(tensors)
    (folder / MANIFEST_FILE).write_bytes(
        Manifest(**_manifest_fields(world, hotkey), tensors_sha256=digest).to_json()
    )
    return Play(folder=folder, commit=_commit_for(world, hotkey, digest))


def _play_cycle_zero(subnet: Subnet, plays: dict[str, Play]) -> None:
    """Commit in the commit phase, upload and reveal in the reveal phase, stop at the evaluate phase."""
    cycle_cfg = subnet.world.config.cycle
    subnet.advance_to(phase_bounds(0, "commit", cycle_cfg)[0])
    for name, play in plays.items():
        subnet.chain(name).commit(encode_commitment(CommitPayload(cycle=0, digest=play.commit)))
    subnet.advance_to(phase_bounds(0, "reveal", cycle_cfg)[0])
    for name, play in plays.items():
        if play.reveal is not None:
            subnet.chain(name).commit(play.reveal)
            continue
        ref = subnet.store.upload(play.folder, repo=f"nodes/{name}", files=play.files)
        manifest_sha = hashlib.sha256((play.folder / MANIFEST_FILE).read_bytes()).digest()
        reveal = RevealPayload(
            cycle=0,
            store_kind=ref.kind,
            repo=ref.repo,
            revision=ref.revision,
            manifest_digest=short_digest(manifest_sha),
        )
        subnet.chain(name).commit(encode_commitment(reveal))
    subnet.advance_to(phase_bounds(0, "evaluate", cycle_cfg)[0])


# --- class 3: hostile payloads through the validator -------------------------------------------


class _Detonator:
    """Unpickling it creates a marker file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _with(state: dict[str, torch.Tensor], **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v.clone() for k, v in state.items()}, **extra}


def _poisoned(state: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    out = _with(state)
    out[sorted(out)[0]].view(-1)[3] = value
    return out


# name -> expected validator reason (None: accepted)
HOSTILE = {
    "nan": "non_finite",
    "inf": "non_finite",
    "shape": "shape",
    "dtype": "dtype",
    "router": "extra_key",
    "shared-expert": "extra_key",
    "attention": "extra_key",
    "embeddings": "extra_key",
    "unselected-expert": "extra_key",
    "fused-tensor": "extra_key",
    "pickle": "not_safetensors",
    "torch-zip": "not_safetensors",
    "oversize": "store_too_large",
    "manifest-malformed": "bad_manifest",
    "manifest-huge": "bad_manifest",
    "manifest-domain": "wrong_selection",
    "manifest-cycle": "wrong_cycle",
    "manifest-model-revision": "wrong_selection",
    "traversal-repo": "no_reveal",
    "overflow-activations": "update_too_large",  # x1e25 weights: caught before any forward pass
}
HONEST = ("honest", "honest-many-files")


def _hostile_plays(world: World, root: Path, keys: dict[str, Keypair], marker: Path) -> dict[str, Play]:
    hk = {name: key.ss58_address for name, key in keys.items()}
    a = world.honest_a
    first = sorted(a)[0]
    hidden = world.config.model.inline["hidden_size"]
    vocab = world.config.model.inline["vocab_size"]
    plays: dict[str, Play] = {
        "honest": _written_play(world, root / "honest", hk["honest"], world.honest_b),
        "nan": _written_play(world, root / "nan", hk["nan"], _poisoned(a, float("nan"))),
        "inf": _written_play(world, root / "inf", hk["inf"], _poisoned(a, float("-inf"))),
        "shape": _written_play(
            world, root / "shape", hk["shape"], _with(a, **{first: a[first][:-1].contiguous()})
        ),
        "dtype": _written_play(world, root / "dtype", hk["dtype"], _with(a, **{first: a[first].bfloat16()})),
        "router": _raw_play(
            world, root / "router", hk["router"], _with(a, **{ROUTER_KEY: torch.zeros(8, hidden)})
        ),
        "shared-expert": _raw_play(
            world,
            root / "shared",
            hk["shared-expert"],
            _with(a, **{"model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(32, hidden)}),
        ),
        "attention": _raw_play(
            world,
            root / "attn",
            hk["attention"],
            _with(a, **{"model.layers.0.self_attn.q_proj.weight": torch.eye(hidden)}),
        ),
        "embeddings": _raw_play(
            world,
            root / "embed",
            hk["embeddings"],
            _with(a, **{"model.embed_tokens.weight": torch.zeros(vocab, hidden)}),
        ),
        "unselected-expert": _raw_play(
            world,
            root / "unselected",
            hk["unselected-expert"],
            _with(a, **{"model.layers.0.mlp.experts.3.up_proj.weight": a[first].clone()}),
        ),
        "fused-tensor": _raw_play(
            world,
            root / "fused",
            hk["fused-tensor"],
            _with(a, **{"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 2)}),
        ),
        "manifest-domain": _written_play(world, root / "mdomain", hk["manifest-domain"], a, domain="code"),
        "manifest-cycle": _written_play(world, root / "mcycle", hk["manifest-cycle"], a, cycle=5),
        "manifest-model-revision": _written_play(
            world, root / "mrev", hk["manifest-model-revision"], a, model_revision="other-base"
        ),
    }
    many = _written_play(world, root / "many", hk["honest-many-files"], a)
    extras = [f"shard-{i:03d}.bin" for i in range(60)] + ["pytorch_model.bin", "model.py", "config.json"]
    for name in extras:
        (many.folder / name).write_bytes(pickle.dumps(_Detonator(marker)))
    plays["honest-many-files"] = Play(
        folder=many.folder, commit=many.commit, files=(*CHECKPOINT_FILES, *extras)
    )

    pickled = _written_play(world, root / "pickle", hk["pickle"], a)
    (pickled.folder / EXPERTS_FILE).write_bytes(pickle.dumps({"weights": _Detonator(marker)}))
    plays["pickle"] = pickled
    zipped = _written_play(world, root / "zip", hk["torch-zip"], a)
    torch.save({"weights": _Detonator(marker)}, zipped.folder / EXPERTS_FILE)
    plays["torch-zip"] = zipped
    oversize = _written_play(world, root / "oversize", hk["oversize"], a)
    os.truncate(oversize.folder / EXPERTS_FILE, 10 * PAYLOAD_CAP)
    plays["oversize"] = oversize
    malformed = _written_play(world, root / "malformed", hk["manifest-malformed"], a)
    (malformed.folder / MANIFEST_FILE).write_bytes(b'{"kind": "submission", "cycle": ')
    plays["manifest-malformed"] = malformed
    huge = _written_play(world, root / "huge", hk["manifest-huge"], a)
    (huge.folder / MANIFEST_FILE).write_bytes(
        (huge.folder / MANIFEST_FILE).read_bytes() + b" " * (3 * MANIFEST_CAP)
    )
    plays["manifest-huge"] = huge

    overflow = _with(world.genesis)
    for projection in ("gate_proj", "up_proj"):  # finite weights; their product overflows fp32
        overflow[f"model.layers.1.mlp.experts.0.{projection}.weight"] *= 1e25
    plays["overflow-activations"] = _written_play(
        world, root / "overflow", hk["overflow-activations"], overflow
    )

    revision = bytes.fromhex("ab" * 32)  # a reveal hand-packed around the encoder: repo ../../outside
    repo = b"../../outside"
    body = struct.pack(">IBB", 0, 1, len(revision)) + revision + b"d" * 16 + bytes([len(repo)]) + repo
    plays["traversal-repo"] = Play(folder=root / "nowhere", commit=b"\x07" * 32, reveal=b"cn\x01R" + body)
    return plays


@dataclass(frozen=True, slots=True, kw_only=True)
class HostileOutcome:
    reasons: dict[str, str | None]
    rows: dict[str, object]
    cycle_weights: dict[str, float]
    validator: Validator
    subnet: Subnet
    marker: Path
    root: Path


@pytest.fixture(scope="module")
def hostile(world, tmp_path_factory) -> HostileOutcome:
    """One validator evaluates a cycle of every hostile payload plus two honest submissions."""
    root = tmp_path_factory.mktemp("hostile")
    subnet = _subnet(world, root, [*HONEST, *HOSTILE])
    marker = root / "pickle-executed"
    plays = _hostile_plays(world, root / "submissions", subnet.keys, marker)
    _play_cycle_zero(subnet, plays)
    validator = subnet.validators["v0"]
    validator.evaluate(0)
    result = validator.state.results[0]
    names = {subnet.hotkey(name): name for name in plays}
    rows = {names[row.hotkey]: row for row in result.scores}
    return HostileOutcome(
        reasons={name: row.reason for name, row in rows.items()},
        rows=rows,
        cycle_weights={names[h]: w for h, w in result.cycle_weights.items()},
        validator=validator,
        subnet=subnet,
        marker=marker,
        root=root,
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_submission_is_rejected_with_its_reason(hostile, name):
    """NaN/Inf, wrong shape or dtype, keys outside the selection, pickles, oversize files, bad or
    foreign manifests, traversal repos and overflowing activations: each rejected with its reason."""
    row = hostile.rows[name]
    assert (row.accepted, row.reason) == (False, HOSTILE[name]), row.detail
    assert "\n" not in row.detail


def test_honest_submissions_in_the_same_cycle_are_accepted(hostile):
    """The hostile cycle is not rejecting everything: the honest ones pass and share the weights."""
    assert {name: hostile.reasons[name] for name in HONEST} == {name: None for name in HONEST}
    assert set(hostile.cycle_weights) == set(HONEST)


def test_validator_model_and_global_are_bit_identical_after_hostile_cycle(hostile, world):
    """After verifying and scoring every payload (experts swapped in and out), the resident model
    equals a fresh load of the base model, and the global state is still genesis."""
    validator = hostile.validator
    fresh = load_model(world.base_dir, world.config.model)
    assert validator._model is not None  # the resident model was used for scoring
    assert _model_digest(validator._model) == _model_digest(fresh)
    assert validator.global_state.revision == world.genesis_revision
    assert tensors_digest(validator.global_state.experts) == world.genesis_revision


def test_no_pickle_is_ever_executed(hostile):
    """Pickles as experts.safetensors, torch.save zips and pickles among repo files never run."""
    assert (
        hostile.reasons["pickle"] == "not_safetensors" and hostile.reasons["torch-zip"] == "not_safetensors"
    )
    assert not hostile.marker.exists()


def test_oversize_is_refused_before_a_byte_is_copied(hostile):
    """A payload 10x the cap costs the validator a size lookup: nothing lands in its download folder."""
    dest = hostile.validator.ctx.workdir / "downloads" / "0" / hostile.subnet.hotkey("oversize")
    assert not dest.exists() or not any(dest.iterdir())


def test_only_checkpoint_files_are_fetched_from_a_many_file_repo(hostile):
    """A revision with 65 files (pickles, code, configs) yields exactly the two checkpoint files."""
    dest = hostile.validator.ctx.workdir / "downloads" / "0" / hostile.subnet.hotkey("honest-many-files")
    assert sorted(p.name for p in dest.iterdir()) == sorted(CHECKPOINT_FILES)


def test_traversal_repo_touches_nothing_outside_the_store(hostile):
    """A reveal naming ../../outside never decodes, so no path outside the store is even built."""
    assert not (hostile.root.parent / "outside").exists() and not (hostile.root / "outside").exists()


# --- class 3: the size cap and the file list through the loopback Hub --------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[HubServer]:
    with running_hub(monkeypatch, tmp_path / "hf_home") as server:
        yield server


def _hf_store(hub: HubServer) -> HfHubStore:
    return HfHubStore(token=None, endpoint=hub.url, max_retries=0, backoff_s=0.0)


def _hf_observation(sha: str, manifest: bytes, commit: bytes) -> Observation:
    return Observation(
        commit_digest=commit.hex(),
        commit_block=2,
        reveal_kind="hf",
        reveal_repo="miner/experts",
        reveal_revision=sha,
        reveal_manifest_digest=short_digest(hashlib.sha256(manifest).digest()).hex(),
        reveal_block=4,
    )


def _fetch(world: World, store, entry: Observation, dest: Path, hotkey: str) -> Candidate:
    return fetch_and_verify(
        store,
        entry,
        dest,
        hotkey=hotkey,
        uid=3,
        cycle=0,
        config=world.config,
        selection=world.selection,
        expected=world.expected,
        global_revision=world.genesis_revision,
    )


def test_hub_checkpoint_over_the_cap_is_refused_before_download(world, hub, tmp_path):
    """10x the byte cap on the Hub: refused from paths-info sizes, no file content ever requested."""
    play = _written_play(world, tmp_path / "ckpt", "5Fminer", world.honest_a)
    manifest = (play.folder / MANIFEST_FILE).read_bytes()
    sha = hub.add_commit("miner/experts", {EXPERTS_FILE: bytes(10 * PAYLOAD_CAP), MANIFEST_FILE: manifest})
    with pytest.raises(StoreError) as info:
        _fetch(
            world, _hf_store(hub), _hf_observation(sha, manifest, play.commit), tmp_path / "dest", "5Fminer"
        )
    assert info.value.reason == "too_large"
    assert hub.resolve_paths() == []
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_hub_repo_with_many_files_yields_only_the_checkpoint(world, hub, tmp_path):
    """A Hub revision with 100 extra files (pickles, code, nested copies): only the two checkpoint
    files are requested, and the submission verifies."""
    hotkey = "5Fminer"
    play = _written_play(world, tmp_path / "ckpt", hotkey, world.honest_a)
    files = {name: (play.folder / name).read_bytes() for name in CHECKPOINT_FILES}
    extras = {f"extra/{i}.bin": b"x" for i in range(96)}
    extras |= {
        "pytorch_model.bin": pickle.dumps(1),
        "modeling.py": b"import os",
        "sub/experts.safetensors": b"0",
    }
    extras["../experts.safetensors"] = b"evil"
    sha = hub.add_commit("miner/experts", {**files, **extras})
    candidate = _fetch(
        world,
        _hf_store(hub),
        _hf_observation(sha, files[MANIFEST_FILE], play.commit),
        tmp_path / "dest",
        hotkey,
    )
    assert candidate.tensors_sha256 == tensors_digest(world.honest_a)
    assert sorted({path.rsplit("/", 1)[-1] for path in hub.resolve_paths()}) == sorted(CHECKPOINT_FILES)
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(CHECKPOINT_FILES)


@pytest.mark.parametrize("name", ["../experts.safetensors", "a/b", "/etc/passwd", "..", "a\\b", ".hidden"])
def test_path_like_file_names_are_refused_by_both_stores(hub, tmp_path, name):
    """File names with separators or ``..`` are refused before any I/O, by the Hub and local stores."""
    hf_ref = StoreRef(kind="hf", repo="miner/experts", revision="ab" * 20)
    with pytest.raises(StoreError) as info:
        _hf_store(hub).download(hf_ref, tmp_path / "dest", max_bytes=1 << 20, files=(name,))
    assert info.value.reason == "refused" and hub.requests == []
    local = LocalStore(tmp_path / "store")
    (tmp_path / "src").mkdir()
    with pytest.raises(StoreError) as info:
        local.upload(tmp_path / "src", repo="miner/experts", files=(name,))
    assert info.value.reason == "refused"
    assert not (tmp_path / "store").exists()


def test_oversized_manifest_is_refused_before_it_is_read(world, tmp_path, monkeypatch):
    """A manifest up to the whole payload cap (512 MiB by default) must not be read into memory and
    hashed before the loader refuses it for exceeding max_manifest_bytes."""
    hotkey = "5Fminer"
    play = _written_play(world, tmp_path / "ckpt", hotkey, world.honest_a)
    manifest_path = play.folder / MANIFEST_FILE
    manifest_path.write_bytes(manifest_path.read_bytes() + b" " * (10 * MANIFEST_CAP))
    store = LocalStore(tmp_path / "store")
    ref = store.upload(play.folder, repo="miner/experts")
    entry = Observation(
        commit_digest=play.commit.hex(),
        commit_block=2,
        reveal_kind="local",
        reveal_repo=ref.repo,
        reveal_revision=ref.revision,
        reveal_block=4,
        reveal_manifest_digest=short_digest(hashlib.sha256(manifest_path.read_bytes()).digest()).hex(),
    )
    original = Path.read_bytes

    def guarded(self: Path) -> bytes:
        if self.name == MANIFEST_FILE and self.stat().st_size > MANIFEST_CAP:
            raise AssertionError(f"read {self.stat().st_size} bytes of an over-cap manifest")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", guarded)
    with pytest.raises(InvalidSubmission) as info:
        _fetch(world, store, entry, tmp_path / "dest", hotkey)
    assert info.value.reason == "bad_manifest"


# --- class 3: connito verify-checkpoint on a hostile set ---------------------------------------


def test_verify_checkpoint_cli_rejects_each_hostile_variant_with_its_own_reason(world, tmp_path, capsys):
    """``python -m connito.cli verify-checkpoint`` on five hostile copies of a real checkpoint (NaN,
    a router key, a wrong shape, a pickle named .safetensors, 10x the size cap): exit 1 with one
    line and a distinct reason each. The real checkpoint itself verifies (in-process, same code)."""
    selection_path = tmp_path / "selection.json"
    save_selection(world.selection, selection_path)
    a = world.honest_a
    first = sorted(a)[0]  # a down_proj: (H, I)
    _written_play(world, tmp_path / "real", "5Fminer", a)
    assert verify_checkpoint_cli(tmp_path / "real", selection_path, max_bytes=PAYLOAD_CAP) == 0
    assert " ok " in capsys.readouterr().out
    variants = {
        "nan": "non_finite",
        "router": "extra_key",
        "shape": "shape",
        "pickle": "not_safetensors",
        "oversize": "too_large",
    }
    folders = {name: tmp_path / name for name in variants}
    _written_play(world, folders["nan"], "5Fminer", _poisoned(a, float("nan")))
    _raw_play(world, folders["router"], "5Fminer", _with(a, **{ROUTER_KEY: torch.zeros(8, 32)}))
    _written_play(world, folders["shape"], "5Fminer", _with(a, **{first: a[first][:-1].contiguous()}))
    _written_play(world, folders["pickle"], "5Fminer", a)
    (folders["pickle"] / EXPERTS_FILE).write_bytes(pickle.dumps({"w": [1.0] * 100}))
    _written_play(world, folders["oversize"], "5Fminer", a)
    os.truncate(folders["oversize"] / EXPERTS_FILE, 10 * PAYLOAD_CAP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "connito.cli", "verify-checkpoint"]
    processes = {  # started together: each pays the torch import once, in parallel
        name: subprocess.Popen(
            [*command, str(folder), "--selection", str(selection_path), "--max-bytes", str(PAYLOAD_CAP)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, folder in folders.items()
    }
    reasons = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, (name, out, err)
        lines = [line for line in err.splitlines() if ": rejected: " in line]
        assert len(lines) == 1 and out == "", err
        reasons[name] = lines[0].split(": rejected: ", 1)[1].split(":", 1)[0]
    assert reasons == variants
    assert len(set(reasons.values())) == len(reasons)


# --- class 4: norm poisoning -------------------------------------------------------------------


def test_norm_poisoned_pseudo_gradient_is_clipped_in_the_merge(world):
    """A same-loss rescale of honest experts has ~10**3 x the median pseudo-gradient norm; with the
    domain's clip_norm the merged update stays within clip_norm x median x the outer step."""
    poisoned = _rescaled(world.honest_a, POISON_SCALE)
    submissions = [world.honest_a, world.honest_b, poisoned]
    norms = [float(pseudo_gradient(world.genesis, s).double().norm()) for s in submissions]
    median = sorted(norms)[1]
    assert norms[2] >= 1000 * median
    outer = initial_outer_state(world.genesis)
    merge = world.config.merge  # clip_norm 4.0, lr 0.7, momentum 0.9, Nesterov
    clipped, _ = apply_merge(outer, submissions, [1 / 3] * 3, merge)
    naive, _ = apply_merge(outer, submissions, [1 / 3] * 3, merge.model_copy(update={"clip_norm": None}))
    first_step = merge.outer_lr * (1 + merge.momentum)  # Nesterov's first step from zero momentum
    bound = first_step * merge.clip_norm * median
    assert float(pseudo_gradient(world.genesis, clipped).double().norm()) <= bound * (1 + 1e-4)
    assert float(pseudo_gradient(world.genesis, naive).double().norm()) > 100 * bound


@pytest.mark.parametrize("clip_norm", [None, 4.0], ids=["no-clip", "clip-4"])
def test_lead_never_publishes_a_global_worse_than_the_current_one(world, tmp_path, clip_norm):
    """With the update bound and the normalised step switched off (the merge gate alone), two honest miners
    and a norm poisoner (same loss, 10**3 x norm) are all accepted; whatever the outer step does
    with them, the lead publishes only a global that beats the current one on the cycle's
    held-out sample, and never the wrecked unclipped merge."""
    # the merge gate alone: no update bound, and no normalised step (which would already shorten
    # the poisoner's 10**3 x step to the others' length and reject it as no_improvement)
    scoring = world.config.scoring.model_copy(update={"update_bound_factor": None, "normalised_step": False})
    merge = MergeConfig(top_n=3, clip_norm=clip_norm)
    config = world.config.model_copy(update={"merge": merge, "scoring": scoring})
    subnet = _subnet(world, tmp_path, ["a", "b", "poisoner"], config=config)
    states = {"a": world.honest_a, "b": world.honest_b, "poisoner": _rescaled(world.honest_a, POISON_SCALE)}
    plays = {
        name: _written_play(world, tmp_path / name, subnet.hotkey(name), s) for name, s in states.items()
    }
    _play_cycle_zero(subnet, plays)
    lead = subnet.validators["v0"]
    lead.evaluate(0)
    result = lead.state.results[0]
    rows = {row.hotkey: row for row in result.scores}
    assert all(rows[subnet.hotkey(name)].accepted for name in states), [
        (r.reason, r.detail) for r in rows.values()
    ]
    subnet.advance_to(phase_bounds(0, "merge", world.config.cycle)[0])
    lead.merge(0)
    result = lead.state.results[0]
    global_loss = result.global_domain_loss
    assert result.decision in ("merged", "best_single")
    published = lead.global_state.experts
    assert lead.global_state.revision == result.result_revision
    assert _heldout_loss(world, published, result.eval_seed) < global_loss
    if clip_norm is None:
        naive, _ = apply_merge(
            initial_outer_state(world.genesis), list(states.values()), [1 / 3] * 3, config.merge
        )
        assert _heldout_loss(world, naive, result.eval_seed) > global_loss  # the gate had work to do
        assert result.decision != "merged"


def test_norm_poisoned_submission_is_never_published_as_the_global(world, tmp_path):
    """Only the poisoner trained layer 0 (honest b trained layer 1), so its rescaled experts rank
    first; the unclipped merge is wrecked, and the lead must still not publish the 10**3 x
    parametrisation as the global: every later miner's AdamW steps on its down_proj would be
    ~10**3 x too large relative to the weights."""
    config = world.config.model_copy(update={"merge": MergeConfig(top_n=3, clip_norm=None)})  # no clip
    subnet = _subnet(world, tmp_path, ["b", "poisoner"], config=config)
    states = {"b": world.honest_b, "poisoner": _rescaled(world.honest_a, POISON_SCALE)}
    plays = {
        name: _written_play(world, tmp_path / name, subnet.hotkey(name), s) for name, s in states.items()
    }
    _play_cycle_zero(subnet, plays)
    lead = subnet.validators["v0"]
    lead.evaluate(0)
    reasons = {row.hotkey: row.reason for row in lead.state.results[0].scores}
    assert reasons == {subnet.hotkey("b"): None, subnet.hotkey("poisoner"): "update_too_large"}
    subnet.advance_to(phase_bounds(0, "merge", world.config.cycle)[0])
    lead.merge(0)
    median = min(float(pseudo_gradient(world.genesis, s).double().norm()) for s in states.values())
    published = float(pseudo_gradient(world.genesis, lead.global_state.experts).double().norm())
    assert published < 100 * median  # the poisoner's norm is > 1000 x the median


# --- class 8: the evaluation seed -------------------------------------------------------------


class _ForkedHashes:
    """A chain whose history differs at some blocks (fault injection): different hashes there."""

    def __init__(self, chain: LocalChain, blocks: set[int]) -> None:
        self._chain = chain
        self._blocks = blocks

    def block_hash(self, block: int) -> str:
        real = self._chain.block_hash(block)
        return "0x" + hashlib.sha256(b"fork" + real.encode()).hexdigest() if block in self._blocks else real

    def __getattr__(self, name: str):
        return getattr(self._chain, name)


def _evaluated_seed(
    world: World, root: Path, *, chain_seed: int = 7, forked: set[int] = frozenset()
) -> tuple[int, float]:
    """(eval seed, global held-out loss) that a validator records for cycle 0 on such a chain."""
    subnet = _subnet(world, root, ["m0"], seed=chain_seed)
    subnet.advance_to(phase_bounds(0, "evaluate", world.config.cycle)[0])
    validator = subnet.validators["v0"]
    if forked:
        validator.ctx = dataclasses.replace(
            validator.ctx, chain=_ForkedHashes(validator.ctx.chain, set(forked))
        )
    validator.evaluate(0)
    result = validator.state.results[0]
    return result.eval_seed, result.global_domain_loss


def test_all_validators_draw_the_same_evaluation_sample(world, tmp_path):
    """Two validators reading one chain record the same seed and the same global loss on it."""
    subnet = _subnet(world, tmp_path, ["m0"], validators=("v0", "v1"))
    subnet.advance_to(phase_bounds(0, "evaluate", world.config.cycle)[0])
    for validator in subnet.validators.values():
        validator.evaluate(0)
    first, second = (v.state.results[0] for v in subnet.validators.values())
    assert first.eval_seed == second.eval_seed
    assert first.global_domain_loss == second.global_domain_loss
    expected = eval_seed(
        seed_block_hash=subnet.chain().block_hash(seed_block(0, world.config.cycle)),
        domain=world.config.name,
        cycle=0,
    )
    assert first.eval_seed == expected


def test_eval_seed_is_fixed_only_by_the_block_after_the_commit_deadline(world, tmp_path):
    """Rewriting every block hash up to the commit deadline (all a miner could see when committing)
    or after the seed block leaves the seed unchanged; changing the seed block's hash, or the
    genesis seed of the ledger, changes it."""
    cycle_cfg = world.config.cycle
    deadline, seed_at = commit_deadline(0, cycle_cfg), seed_block(0, cycle_cfg)
    evaluate_at = phase_bounds(0, "evaluate", cycle_cfg)[0]
    assert seed_at == deadline + 1
    reference, _ = _evaluated_seed(world, tmp_path / "ref")
    known_at_commit, _ = _evaluated_seed(world, tmp_path / "early", forked=set(range(0, deadline + 1)))
    later, _ = _evaluated_seed(world, tmp_path / "late", forked=set(range(seed_at + 1, evaluate_at + 1)))
    seed_block_forked, _ = _evaluated_seed(world, tmp_path / "seed", forked={seed_at})
    other_ledger, _ = _evaluated_seed(world, tmp_path / "ledger", chain_seed=8)
    assert known_at_commit == reference == later
    assert seed_block_forked != reference and other_ledger != reference


def test_seed_block_hash_is_unknowable_at_the_commit_deadline(world, tmp_path):
    """While commits still count, the chain cannot produce the seed block's hash."""
    subnet = _subnet(world, tmp_path, ["m0"])
    cycle_cfg = world.config.cycle
    subnet.advance_to(commit_deadline(0, cycle_cfg))
    with pytest.raises(ChainError):
        subnet.chain().block_hash(seed_block(0, cycle_cfg))
    subnet.advance_to(seed_block(0, cycle_cfg))
    assert subnet.chain().block_hash(seed_block(0, cycle_cfg)).startswith("0x")


def _expert_hits(
    model: torch.nn.Module, layer: int, expert: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id: does a sequence of only that token route (always, ever) through ``expert``?"""
    tokens = torch.arange(vocab).unsqueeze(1).repeat(1, 8)  # (V, 8): one repeated token per row
    indices: list[torch.Tensor] = []
    router = next(m for m in moe_layers(model) if m.index == layer).router
    handle = router.register_forward_hook(lambda _module, _inputs, output: indices.append(output[2]))
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    routed = (indices[0] == expert).any(-1).reshape(vocab, 8)  # (V, T): the router's top-k (V*T, k)
    return routed.all(-1), routed.any(-1)


def test_overflow_on_hard_batches_only_is_rejected_whole(world):
    """Finite weights (they pass the strict loader) whose activations overflow only on the batches
    that route through one expert: non_finite for the whole submission, no partial score."""
    model = load_model(world.base_dir, world.config.model)
    vocab = world.config.model.inline["vocab_size"]
    always, ever = _expert_hits(model, layer=0, expert=2, vocab=vocab)
    hit = int(torch.nonzero(always)[0])
    misses = [int(t) for t in torch.nonzero(~ever)[:2]]
    batches = [torch.full((1, 8), misses[0]), torch.full((1, 8), misses[1]), torch.full((1, 8), hit)]
    poisoned = _with(world.genesis)
    for projection in ("gate_proj", "up_proj"):
        poisoned[f"model.layers.0.mlp.experts.2.{projection}.weight"] *= 1e25
    assert all(bool(torch.isfinite(t).all()) for t in poisoned.values())
    write_experts(model, poisoned)
    per_batch = batch_losses(model, batches)
    write_experts(model, world.genesis)
    assert [torch.isfinite(torch.tensor(x)).item() for x in per_batch] == [
        True,
        True,
        False,
    ]  # the trick works
    candidate = Candidate(
        hotkey="5Fhider", uid=1, commit_block=2, tensors_sha256=tensors_digest(poisoned), state=poisoned
    )
    before = _model_digest(model)
    _, [score] = score_submissions(
        model,
        world.genesis,
        [candidate],
        domain_batches=batches,
        general_batches=[],
        config=world.config.scoring,
    )
    assert (score.accepted, score.reason, score.domain_loss, score.utility) == (
        False,
        "non_finite",
        None,
        0.0,
    )
    assert "1 of 3" in score.detail
    assert _model_digest(model) == before


def test_overflowing_weights_pass_the_strict_loader(world, tmp_path):
    """The hard-batch trick is invisible to the loader (finite weights): only scoring can catch it."""
    poisoned = _with(world.genesis)
    poisoned["model.layers.0.mlp.experts.2.up_proj.weight"] *= 1e25
    write_checkpoint(tmp_path / "ckpt", poisoned, **_manifest_fields(world, "5Fhider"))
    _, loaded = load_checkpoint(
        tmp_path / "ckpt", selection=world.selection, expected=world.expected, max_bytes=PAYLOAD_CAP
    )
    assert tensors_digest(loaded) == tensors_digest(poisoned)


# --- class 8: held-out documents never reach a miner --------------------------------------------


def _stream_documents(blocks: torch.Tensor, eos: int) -> set[tuple[int, ...]]:
    """Complete documents in a packed token stream (between two EOS; the cut ends are dropped)."""
    stream = blocks.reshape(-1).tolist()
    cuts = [i for i, token in enumerate(stream) if token == eos]
    return {tuple(stream[a + 1 : b]) for a, b in zip(cuts, cuts[1:], strict=False)}


def _heldout_token_docs(domain: DomainData, texts: list[str]) -> set[tuple[int, ...]]:
    tokenized = tokenize_documents(texts, domain.tokenizer)
    return {
        tuple(tokenized.tokens[tokenized.offsets[i] : tokenized.offsets[i + 1]].tolist())
        for i in range(len(texts))
    }


def test_validation_documents_never_appear_in_any_miner_shard(tmp_path):
    """Explicit validation text, and exact copies of it planted in the training source, never reach
    the packed training stream of any shard; neither do the hash-held-out documents."""
    documents = generate_math_documents(240)
    validation = documents[:20]
    train_path, validation_path = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents + validation))
    validation_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in validation))
    tokenizer = TokenizerConfig(kind="local_bpe", vocab_size=512)
    explicit = DataConfig(
        train=[DataSource(kind="files", name=str(train_path))],
        validation=[DataSource(kind="files", name=str(validation_path))],
        sequence_length=32,
        tokenizer=tokenizer,
    )
    hashed = DataConfig(
        train=[DataSource(kind="files", name=str(train_path))],
        heldout_fraction=0.2,
        sequence_length=32,
        tokenizer=tokenizer,
    )
    hashed_out = split_documents(documents + validation, heldout_fraction=0.2).heldout
    for config, heldout in ((explicit, validation), (hashed, hashed_out)):
        domain = build_domain_data(config, cache_dir=tmp_path / "cache")
        assert domain.stats.heldout_documents == len(heldout) > 0
        held = _heldout_token_docs(domain, heldout)
        for num_shards in (1, 3):
            for shard in range(num_shards):
                seen = _stream_documents(domain.train_blocks(shard, num_shards), domain.eos_token_id)
                assert seen and not (seen & held)
