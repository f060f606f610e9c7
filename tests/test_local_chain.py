"""LocalChain keeps the chain's rules: clock, hashes, signed writes, rate limits, many processes."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from bittensor.sp_core import Keypair
from hypothesis import given
from hypothesis import strategies as st

import connito.chain.local as local
from connito.chain.base import Chain, ChainParams, Neuron
from connito.chain.local import MAX_COMMITMENT_BYTES, LocalChain
from connito.chain.local_ledger import GenesisNeuron
from connito.chain.local_signing import (
    create_wallet,
    decode_weights,
    encode_weights,
    sign,
    signing_message,
    verify_signature,
)
from connito.errors import ChainError

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITER_SCRIPT = Path(__file__).with_name("chain_writer_proc.py")
URIS = ["//Alice", "//Bob", "//Charlie", "//Dave"]
KEYS = {uri: Keypair.create_from_uri(uri) for uri in [*URIS, "//Eve"]}
ALICE, BOB, CHARLIE, DAVE, EVE = (KEYS[u].ss58_address for u in [*URIS, "//Eve"])


def _genesis(
    path: Path,
    *,
    seed: int = 1,
    weights_rate_limit: int = 0,
    commitment_rate_limit: int = 0,
    **kwargs: object,
) -> LocalChain:
    """Alice (uid 0) and Bob (uid 1) validate; Charlie (2) and Dave (3) mine; Eve is unregistered."""
    neurons = [
        GenesisNeuron(hotkey=ALICE, stake=100.0, validator_permit=True),
        GenesisNeuron(hotkey=BOB, stake=50.0, validator_permit=True),
        GenesisNeuron(hotkey=CHARLIE),
        GenesisNeuron(hotkey=DAVE),
    ]
    return LocalChain.genesis(
        path,
        netuid=7,
        seed=seed,
        neurons=neurons,
        tempo=10,
        weights_rate_limit=weights_rate_limit,
        commitment_rate_limit=commitment_rate_limit,
        **kwargs,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    _genesis(tmp_path / "ledger.db")
    return tmp_path / "ledger.db"


def _as(path: Path, uri: str) -> LocalChain:
    return LocalChain.open(path, wallet=KEYS[uri])


# ---- genesis, metagraph, params ------------------------------------------------------------


def test_genesis_metagraph_lists_neurons_by_uid_in_genesis_order(tmp_path: Path) -> None:
    chain = _genesis(tmp_path / "ledger.db")
    assert isinstance(chain, Chain)
    assert chain.hotkey is None and chain.netuid == 7 and chain.current_block() == 0
    assert chain.metagraph() == [
        Neuron(uid=0, hotkey=ALICE, stake=100.0, validator_permit=True),
        Neuron(uid=1, hotkey=BOB, stake=50.0, validator_permit=True),
        Neuron(uid=2, hotkey=CHARLIE, stake=0.0, validator_permit=False),
        Neuron(uid=3, hotkey=DAVE, stake=0.0, validator_permit=False),
    ]
    assert chain.params() == ChainParams(tempo=10, weights_rate_limit=0, commitment_rate_limit=0)
    assert chain.commitments() == [] and chain.weights() == {}


def test_genesis_refuses_to_overwrite_an_existing_ledger(ledger: Path) -> None:
    _as(ledger, "//Charlie").commit(b"keep me")
    with pytest.raises(ChainError, match="already exists"):
        _genesis(ledger, seed=2)
    assert [c.data for c in LocalChain.open(ledger).commitments()] == [b"keep me"]
    assert not any("genesis" in p.name for p in ledger.parent.iterdir())  # no temp file left


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"neurons": [GenesisNeuron(hotkey="not-an-ss58")]}, "not an ss58 address"),
        ({"neurons": [GenesisNeuron(hotkey=ALICE), GenesisNeuron(hotkey=ALICE)]}, "duplicate hotkey"),
        ({"neurons": [GenesisNeuron(hotkey=ALICE, stake=-1.0)]}, "stake"),
        ({"neurons": [GenesisNeuron(hotkey=ALICE, stake=math.nan)]}, "stake"),
        ({"netuid": 70000}, "netuid"),
        ({"seed": -1}, "seed"),
        ({"tempo": 0}, "tempo"),
        ({"weights_rate_limit": -1}, "weights_rate_limit"),
        ({"commitment_rate_limit": -1}, "commitment_rate_limit"),
        ({"block_time_s": -12.0}, "block_time_s"),
    ],
)
def test_genesis_rejects_invalid_parameter_naming_it(tmp_path: Path, kwargs: dict, field: str) -> None:
    args: dict = {"netuid": 7, "seed": 1, "neurons": [GenesisNeuron(hotkey=ALICE)], **kwargs}
    with pytest.raises(ChainError, match=field):
        LocalChain.genesis(tmp_path / "ledger.db", **args)
    assert not (tmp_path / "ledger.db").exists()


def test_open_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="not found"):
        LocalChain.open(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ChainError, match="junk.db"):
        LocalChain.open(tmp_path / "junk.db")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ChainError, match="not a connito local chain ledger"):
        LocalChain.open(tmp_path / "other.db")


# ---- clock and block hashes ---------------------------------------------------------------


def test_manual_clock_moves_only_by_advance_blocks_seen_by_every_reader(ledger: Path) -> None:
    writer, reader = LocalChain.open(ledger), LocalChain.open(ledger)
    assert reader.current_block() == 0
    assert writer.advance_blocks(5) == 5
    assert writer.advance_blocks(0) == 5
    assert reader.current_block() == 5
    with pytest.raises(ChainError, match="only move forward"):
        writer.advance_blocks(-1)
    assert reader.current_block() == 5


def test_wall_clock_block_is_floor_of_elapsed_over_block_time_plus_advances(tmp_path: Path) -> None:
    now = [1000.0]
    chain = _genesis(tmp_path / "ledger.db", block_time_s=12.0, genesis_time=1000.0, clock=lambda: now[0])
    assert chain.current_block() == 0
    now[0] = 1000.0 + 12 * 3 - 0.001
    assert chain.current_block() == 2
    now[0] = 1000.0 + 12 * 3
    assert chain.current_block() == 3
    assert chain.advance_blocks(4) == 7
    now[0] = 500.0  # a clock before genesis never yields a negative block
    assert chain.current_block() == 4


def test_block_time_zero_means_manual_clock(tmp_path: Path) -> None:
    chain = _genesis(tmp_path / "ledger.db", block_time_s=0, clock=lambda: 1e12)
    assert chain.current_block() == 0
    assert chain.advance_blocks(2) == 2


def test_block_hashes_are_deterministic_per_seed_and_differ_across_seeds(tmp_path: Path) -> None:
    chains = [_genesis(tmp_path / f"{name}.db", seed=seed) for name, seed in [("a", 1), ("b", 1), ("c", 2)]]
    for chain in chains:
        chain.advance_blocks(20)
    hashes = [[chain.block_hash(b) for b in range(21)] for chain in chains]
    assert hashes[0] == hashes[1]
    assert all(h0 != h2 for h0, h2 in zip(hashes[0], hashes[2], strict=True))
    assert len(set(hashes[0])) == 21
    assert all(h.startswith("0x") and len(h) == 66 and int(h, 16) >= 0 for h in hashes[0])


def test_block_hash_of_a_future_or_negative_block_raises(ledger: Path) -> None:
    chain = LocalChain.open(ledger)
    chain.advance_blocks(3)
    assert chain.block_hash(3).startswith("0x")
    with pytest.raises(ChainError, match="block=4"):
        chain.block_hash(4)
    with pytest.raises(ChainError, match="block=-1"):
        chain.block_hash(-1)


# ---- commitments ---------------------------------------------------------------------------


def test_new_commitment_replaces_old_and_history_keeps_both(ledger: Path) -> None:
    charlie = _as(ledger, "//Charlie")
    assert charlie.hotkey == CHARLIE
    assert charlie.commit(b"first") == 0
    charlie.advance_blocks(2)
    assert charlie.commit(b"second") == 2
    commitments = LocalChain.open(ledger).commitments()
    assert [(c.hotkey, c.block, c.data) for c in commitments] == [(CHARLIE, 2, b"second")]
    history = charlie.commitment_history()
    assert [(c.block, c.data) for c in history] == [(0, b"first"), (2, b"second")]


def test_commitments_at_a_past_block_are_what_the_chain_held_then(ledger: Path) -> None:
    """A reveal replaces a commit; a validator that missed the commit reads it back at a past block."""
    charlie, dave = _as(ledger, "//Charlie"), _as(ledger, "//Dave")
    charlie.commit(b"commit")
    charlie.advance_blocks(3)
    dave.commit(b"late")
    charlie.advance_blocks(2)
    charlie.commit(b"reveal")
    at = LocalChain.open(ledger).commitments
    assert [(c.hotkey, c.block, c.data) for c in at(block=0)] == [(CHARLIE, 0, b"commit")]
    assert [(c.hotkey, c.data) for c in at(block=4)] == [(CHARLIE, b"commit"), (DAVE, b"late")]
    assert [(c.hotkey, c.data) for c in at(block=5)] == [(CHARLIE, b"reveal"), (DAVE, b"late")]
    assert at(block=5) == at()
    with pytest.raises(ChainError, match="not there yet"):
        at(block=6)


def test_commitments_lists_latest_of_each_hotkey_ordered_by_uid(ledger: Path) -> None:
    dave, charlie = _as(ledger, "//Dave"), _as(ledger, "//Charlie")
    dave.commit(b"d0")
    charlie.commit(b"c0")
    dave.advance_blocks(1)
    dave.commit(b"d1")
    assert [(c.hotkey, c.data) for c in dave.commitments()] == [(CHARLIE, b"c0"), (DAVE, b"d1")]
    assert [c.data for c in dave.commitment_history(DAVE)] == [b"d0", b"d1"]


def test_commitment_of_exactly_max_bytes_is_accepted_and_one_more_refused(ledger: Path) -> None:
    charlie = _as(ledger, "//Charlie")
    charlie.commit(b"x" * MAX_COMMITMENT_BYTES)
    with pytest.raises(ChainError, match=f"{MAX_COMMITMENT_BYTES + 1} bytes"):
        charlie.commit(b"x" * (MAX_COMMITMENT_BYTES + 1))
    assert [len(c.data) for c in charlie.commitment_history()] == [MAX_COMMITMENT_BYTES]


def test_read_only_chain_refuses_every_write(ledger: Path) -> None:
    chain = LocalChain.open(ledger)
    with pytest.raises(ChainError, match="read-only"):
        chain.commit(b"x")
    with pytest.raises(ChainError, match="read-only"):
        chain.set_weights({2: 1.0})
    assert chain.commitment_history() == [] and chain.weights() == {}


def test_unregistered_hotkey_is_refused(ledger: Path) -> None:
    eve = _as(ledger, "//Eve")
    with pytest.raises(ChainError, match=f"commit refused hotkey={EVE}: hotkey is not registered"):
        eve.commit(b"x")
    with pytest.raises(ChainError, match=f"set_weights refused hotkey={EVE}: hotkey is not registered"):
        eve.set_weights({2: 1.0})
    assert eve.commitment_history() == []


# ---- signatures ----------------------------------------------------------------------------


def test_verify_signature_accepts_the_real_signature_and_rejects_tampering() -> None:
    message = signing_message(netuid=7, kind="commitment", block=3, payload=b"digest")
    signature = bytes(KEYS["//Alice"].sign(message))
    verify_signature(hotkey=ALICE, message=message, signature=signature)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(ChainError, match="bad sr25519 signature"):
        verify_signature(hotkey=ALICE, message=message, signature=tampered)
    with pytest.raises(ChainError, match="bad sr25519 signature"):
        verify_signature(hotkey=BOB, message=message, signature=signature)
    other_block = signing_message(netuid=7, kind="commitment", block=4, payload=b"digest")
    with pytest.raises(ChainError, match="bad sr25519 signature"):
        verify_signature(hotkey=ALICE, message=other_block, signature=signature)
    with pytest.raises(ChainError, match="malformed signature"):
        verify_signature(hotkey=ALICE, message=message, signature=signature[:10])


def test_write_whose_signature_fails_verification_is_not_stored(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def corrupt_sign(keypair: Keypair, message: bytes) -> bytes:
        signature = sign(keypair, message)
        return bytes([signature[0] ^ 1]) + signature[1:]

    monkeypatch.setattr(local, "sign", corrupt_sign)  # patched where LocalChain calls it
    charlie = _as(ledger, "//Charlie")
    with pytest.raises(ChainError, match="bad sr25519 signature"):
        charlie.commit(b"forged")
    assert charlie.commitment_history() == []


@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.sampled_from(["commitment", "weights"]),
            st.integers(0, 2**40),
            st.binary(max_size=16),
        ),
        min_size=2,
        max_size=2,
        unique=True,
    )
)
def test_signing_message_differs_for_any_two_different_writes(writes: list) -> None:
    messages = {signing_message(netuid=n, kind=k, block=b, payload=p) for n, k, b, p in writes}
    assert len(messages) == 2


def test_audit_verifies_every_write_and_detects_a_tampered_row(ledger: Path) -> None:
    _as(ledger, "//Charlie").commit(b"c")
    _as(ledger, "//Alice").set_weights({2: 1.0})
    chain = LocalChain.open(ledger)
    assert chain.audit() == 2
    with sqlite3.connect(ledger) as conn:
        conn.execute("UPDATE writes SET payload = ? WHERE kind = 'commitment'", (b"evil",))
    conn.close()
    with pytest.raises(ChainError, match="seq=1 kind=commitment"):
        chain.audit()


def test_real_bittensor_wallet_is_created_offline_and_signs_writes(tmp_path: Path) -> None:
    wallet = create_wallet(tmp_path / "wallets", "miner", hotkey="hk")
    assert (tmp_path / "wallets" / "miner" / "hotkeys" / "hk").is_file()
    again = create_wallet(tmp_path / "wallets", "miner", hotkey="hk")
    assert again.hotkey.ss58_address == wallet.hotkey.ss58_address
    second = create_wallet(tmp_path / "wallets", "miner", hotkey="hk2")
    assert second.coldkeypub.ss58_address == wallet.coldkeypub.ss58_address
    assert second.hotkey.ss58_address != wallet.hotkey.ss58_address
    hotkey = wallet.hotkey.ss58_address
    LocalChain.genesis(tmp_path / "ledger.db", netuid=1, seed=0, neurons=[GenesisNeuron(hotkey=hotkey)])
    chain = LocalChain.open(tmp_path / "ledger.db", wallet=wallet)
    assert chain.hotkey == hotkey
    chain.commit(b"from a real wallet")
    assert [(c.hotkey, c.data) for c in chain.commitments()] == [(hotkey, b"from a real wallet")]
    assert chain.audit() == 1


# ---- rate limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit_blocks", [1, 5])
def test_commitment_rate_limit_allows_exactly_limit_blocks_after_last(
    tmp_path: Path, limit_blocks: int
) -> None:
    _genesis(tmp_path / "ledger.db", commitment_rate_limit=limit_blocks)
    charlie = _as(tmp_path / "ledger.db", "//Charlie")
    charlie.advance_blocks(10)
    assert charlie.commit(b"a") == 10
    charlie.advance_blocks(limit_blocks - 1)
    with pytest.raises(ChainError, match="commitment rate limit .* 1 blocks remain"):
        charlie.commit(b"b")
    charlie.advance_blocks(1)
    assert charlie.commit(b"b") == 10 + limit_blocks
    assert [c.data for c in charlie.commitment_history()] == [b"a", b"b"]


def test_commitment_rate_limit_message_counts_remaining_blocks(tmp_path: Path) -> None:
    _genesis(tmp_path / "ledger.db", commitment_rate_limit=5)
    charlie = _as(tmp_path / "ledger.db", "//Charlie")
    charlie.commit(b"a")
    charlie.advance_blocks(2)
    with pytest.raises(ChainError, match="last commitment at block 0, 3 blocks remain"):
        charlie.commit(b"b")


def test_zero_rate_limit_allows_two_commitments_in_one_block(ledger: Path) -> None:
    charlie = _as(ledger, "//Charlie")
    assert charlie.commit(b"a") == charlie.commit(b"b") == 0
    assert [c.data for c in charlie.commitments()] == [b"b"]


@pytest.mark.parametrize("limit_blocks", [1, 4])
def test_weights_rate_limit_allows_exactly_limit_blocks_after_last(tmp_path: Path, limit_blocks: int) -> None:
    _genesis(tmp_path / "ledger.db", weights_rate_limit=limit_blocks)
    alice = _as(tmp_path / "ledger.db", "//Alice")
    assert alice.set_weights({2: 1.0}) == 0
    alice.advance_blocks(limit_blocks - 1)
    with pytest.raises(ChainError, match="weights rate limit .* 1 blocks remain"):
        alice.set_weights({3: 1.0})
    assert alice.weights() == {0: {2: 1.0}}
    alice.advance_blocks(1)
    assert alice.set_weights({3: 1.0}) == limit_blocks
    assert alice.weights() == {0: {3: 1.0}}


def test_rate_limits_are_per_hotkey_and_per_kind(tmp_path: Path) -> None:
    _genesis(tmp_path / "ledger.db", weights_rate_limit=10, commitment_rate_limit=10)
    alice, bob = _as(tmp_path / "ledger.db", "//Alice"), _as(tmp_path / "ledger.db", "//Bob")
    alice.commit(b"a")
    alice.set_weights({2: 1.0})
    bob.commit(b"b")
    bob.set_weights({3: 1.0})
    assert [c.data for c in alice.commitments()] == [b"a", b"b"]
    assert alice.weights() == {0: {2: 1.0}, 1: {3: 1.0}}


# ---- weights -------------------------------------------------------------------------------


def test_set_weights_normalises_to_sum_one_keeping_proportions(ledger: Path) -> None:
    alice = _as(ledger, "//Alice")
    alice.set_weights({3: 3.0, 2: 1.0, 1: 0.0})
    assert alice.weights() == {0: {1: 0.0, 2: 0.25, 3: 0.75}}


@given(st.dictionaries(st.integers(0, 0xFFFF), st.floats(1e-6, 1e6), min_size=1, max_size=20))
def test_weights_payload_round_trips_normalised_and_proportional(weights: dict[int, float]) -> None:
    payload = encode_weights(weights, known_uids=set(weights), hotkey=ALICE)
    decoded = decode_weights(payload)
    total = math.fsum(weights.values())
    assert list(decoded) == sorted(weights)
    assert math.isclose(math.fsum(decoded.values()), 1.0, rel_tol=1e-9)
    assert all(math.isclose(decoded[uid], w / total, rel_tol=1e-12) for uid, w in weights.items())


def test_set_weights_requires_a_validator_permit(ledger: Path) -> None:
    with pytest.raises(ChainError, match=f"set_weights refused hotkey={CHARLIE} uid=2: no validator permit"):
        _as(ledger, "//Charlie").set_weights({0: 1.0})
    assert LocalChain.open(ledger).weights() == {}


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({}, "empty"),
        ({2: math.nan}, "uid=2: weight nan is not a finite number"),
        ({2: math.inf}, "uid=2: weight inf is not a finite number"),
        ({2: 1.0, 3: -0.5}, "uid=3: weight -0.5 is negative"),
        ({2: 1.0, 9: 1.0}, "uid=9: not a registered uid"),
        ({True: 1.0}, "uid=True: not a registered uid"),
        ({2: "1"}, "uid=2: weight '1' is not a finite number"),
        ({2: 0.0, 3: 0.0}, "sum to 0"),
    ],
)
def test_set_weights_rejects_invalid_weights_naming_the_uid(ledger: Path, weights: dict, reason: str) -> None:
    alice = _as(ledger, "//Alice")
    with pytest.raises(ChainError, match=f"set_weights refused hotkey={ALICE}: .*{reason}"):
        alice.set_weights(weights)
    assert alice.weights() == {}


# ---- registration --------------------------------------------------------------------------


def test_deregister_then_register_replaces_the_hotkey_on_a_uid(ledger: Path) -> None:
    chain = LocalChain.open(ledger)
    _as(ledger, "//Dave").commit(b"dave's")
    _as(ledger, "//Bob").set_weights({3: 1.0})
    assert chain.deregister(DAVE) == 3
    registered_at = chain.advance_blocks(5)
    assert chain.register(EVE, uid=3) == 3
    assert chain.metagraph()[3] == Neuron(
        uid=3, hotkey=EVE, stake=0.0, validator_permit=False, registered_block=registered_at
    )
    assert registered_at > 0 and chain.metagraph()[0].registered_block == 0  # genesis neurons
    assert chain.commitments() == []
    assert [c.hotkey for c in chain.commitment_history()] == [DAVE]
    with pytest.raises(ChainError, match=f"commit refused hotkey={DAVE}: hotkey is not registered"):
        _as(ledger, "//Dave").commit(b"again")
    _as(ledger, "//Eve").commit(b"eve's")
    assert [(c.hotkey, c.data) for c in chain.commitments()] == [(EVE, b"eve's")]
    chain.deregister(BOB)
    assert chain.weights() == {}


def test_register_takes_lowest_free_uid_and_refuses_duplicates(ledger: Path) -> None:
    chain = LocalChain.open(ledger)
    chain.deregister(BOB)
    assert chain.register(EVE, stake=5.0, validator_permit=True) == 1
    assert chain.register(BOB) == 4
    with pytest.raises(ChainError, match="already registered"):
        chain.register(EVE)
    with pytest.raises(ChainError, match="uid=0: taken"):
        chain.register(_fresh_hotkey(), uid=0)
    with pytest.raises(ChainError, match="deregister refused"):
        chain.deregister(_fresh_hotkey())
    assert [n.hotkey for n in chain.metagraph()] == [ALICE, EVE, CHARLIE, DAVE, BOB]


def _fresh_hotkey() -> str:
    return Keypair.create_from_uri("//Ferdie").ss58_address


# ---- processes -----------------------------------------------------------------------------


def _run_writers(ledger: Path, jobs: list[tuple[str, int, str]]) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER_SCRIPT), str(ledger), uri, str(count), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for uri, count, mode in jobs
    ]
    results = []
    for proc, job in zip(procs, jobs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(job, proc.returncode, stdout, stderr))
    return results


def test_concurrent_writer_processes_lose_no_writes(ledger: Path) -> None:
    count = 15
    results = _run_writers(ledger, [(uri, count, "commit") for uri in URIS])
    assert [r.returncode for r in results] == [0] * len(URIS), [r.stderr.decode()[-2000:] for r in results]
    chain = LocalChain.open(ledger)
    assert chain.current_block() == len(URIS) * count  # every advance counted: no lost update
    for uri in URIS:
        history = chain.commitment_history(KEYS[uri].ss58_address)
        assert [c.data for c in history] == [f"{uri}:{i}".encode() for i in range(count)]
        blocks = [c.block for c in history]
        assert blocks == sorted(set(blocks)) and 1 <= blocks[0] and blocks[-1] <= len(URIS) * count
    assert [c.data for c in chain.commitments()] == [f"{uri}:{count - 1}".encode() for uri in URIS]
    assert chain.audit() == len(URIS) * count


def test_process_killed_mid_write_leaves_ledger_unchanged_and_unlocked(ledger: Path) -> None:
    _as(ledger, "//Charlie").commit(b"before")
    (result,) = _run_writers(ledger, [("//Dave", 0, "crash")])
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    chain = LocalChain.open(ledger)
    assert chain.current_block() == 0
    assert [c.data for c in chain.commitment_history()] == [b"before"]
    assert _as(ledger, "//Dave").commit(b"after") == 0
    assert chain.audit() == 2
