"""Protocol math: phases tile every cycle, digests bind every field, commitments round-trip and
decode only into typed payloads or ``CommitmentDecodeError``."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from connito.config import CycleConfig
from connito.errors import CommitmentDecodeError, ConfigError
from connito.protocol.commitments import (
    COMMITMENT_PREFIX,
    COMMITMENT_VERSION,
    MAX_COMMITMENT_BYTES,
    CommitPayload,
    GlobalPayload,
    RevealPayload,
    commit_digest,
    decode_commitment,
    encode_commitment,
    eval_seed,
    eval_seed_bytes,
    max_repo_bytes,
    short_digest,
)
from connito.protocol.phases import (
    PENDING,
    PHASES,
    PhaseInfo,
    commit_deadline,
    cycle_start,
    phase,
    phase_bounds,
    seed_block,
)

# train 10, commit 2, reveal 3, evaluate 4, merge 1 -> 20 blocks per cycle, cycle 0 at block 100.
CFG = CycleConfig(
    train_blocks=10, commit_blocks=2, reveal_blocks=3, evaluate_blocks=4, merge_blocks=1, genesis_block=100
)
SHA = hashlib.sha256(b"tensors").hexdigest()
HF_REV = "0123456789abcdef0123456789abcdef01234567"

cycle_configs = st.builds(
    CycleConfig,
    train_blocks=st.integers(1, 50),
    commit_blocks=st.integers(1, 50),
    reveal_blocks=st.integers(1, 50),
    evaluate_blocks=st.integers(1, 50),
    merge_blocks=st.integers(1, 50),
    genesis_block=st.integers(0, 10_000),
)


# ------------------------------------------------------------------------------------ phases


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (0, PhaseInfo(cycle=-1, phase=PENDING, first_block=0, last_block=99, blocks_left=99)),
        (99, PhaseInfo(cycle=-1, phase=PENDING, first_block=0, last_block=99, blocks_left=0)),
        (100, PhaseInfo(cycle=0, phase="train", first_block=100, last_block=109, blocks_left=9)),
        (109, PhaseInfo(cycle=0, phase="train", first_block=100, last_block=109, blocks_left=0)),
        (110, PhaseInfo(cycle=0, phase="commit", first_block=110, last_block=111, blocks_left=1)),
        (111, PhaseInfo(cycle=0, phase="commit", first_block=110, last_block=111, blocks_left=0)),
        (112, PhaseInfo(cycle=0, phase="reveal", first_block=112, last_block=114, blocks_left=2)),
        (114, PhaseInfo(cycle=0, phase="reveal", first_block=112, last_block=114, blocks_left=0)),
        (115, PhaseInfo(cycle=0, phase="evaluate", first_block=115, last_block=118, blocks_left=3)),
        (118, PhaseInfo(cycle=0, phase="evaluate", first_block=115, last_block=118, blocks_left=0)),
        (119, PhaseInfo(cycle=0, phase="merge", first_block=119, last_block=119, blocks_left=0)),
        (120, PhaseInfo(cycle=1, phase="train", first_block=120, last_block=129, blocks_left=9)),
        (131, PhaseInfo(cycle=1, phase="commit", first_block=130, last_block=131, blocks_left=0)),
        (139, PhaseInfo(cycle=1, phase="merge", first_block=139, last_block=139, blocks_left=0)),
    ],
)
def test_phase_at_every_boundary(block: int, expected: PhaseInfo) -> None:
    """Each phase starts and ends on the exact block the lengths imply (no off-by-one)."""
    assert phase(block, CFG) == expected


def test_phase_at_genesis_zero_starts_cycle_zero_at_block_zero() -> None:
    """With genesis 0 there is no pending phase: block 0 is cycle 0's first train block."""
    cfg = CFG.model_copy(update={"genesis_block": 0})
    assert phase(0, cfg) == PhaseInfo(cycle=0, phase="train", first_block=0, last_block=9, blocks_left=9)


def test_phase_rejects_negative_block() -> None:
    """A negative block is a caller bug and fails with the field named."""
    with pytest.raises(ConfigError, match="block"):
        phase(-1, CFG)


def test_commit_deadline_and_seed_block_are_adjacent_and_straddle_phases() -> None:
    """The deadline is the last commit block and the seed block is the first reveal block."""
    assert commit_deadline(0, CFG) == 111
    assert seed_block(0, CFG) == 112
    assert phase(commit_deadline(3, CFG), CFG).phase == "commit"
    assert phase(commit_deadline(3, CFG), CFG).blocks_left == 0
    assert phase(seed_block(3, CFG), CFG).phase == "reveal"
    assert seed_block(3, CFG) == phase_bounds(3, "reveal", CFG)[0]


def test_cycle_start_and_phase_bounds_rejects_bad_input() -> None:
    """Negative cycles and unknown phase names fail with the field named."""
    with pytest.raises(ConfigError, match="cycle"):
        cycle_start(-1, CFG)
    with pytest.raises(ConfigError, match="phase"):
        phase_bounds(0, "pending", CFG)
    with pytest.raises(ConfigError, match="phase"):
        phase_bounds(0, "window", CFG)


@settings(max_examples=200, deadline=None)
@given(cfg=cycle_configs, cycle_index=st.integers(0, 1000))
def test_phases_tile_every_cycle_exactly_once(cfg: CycleConfig, cycle_index: int) -> None:
    """Every block of a cycle maps to exactly one phase; phases are contiguous and in order."""
    start = cycle_start(cycle_index, cfg)
    seen: list[str] = []
    for block in range(start, start + cfg.cycle_blocks):
        info = phase(block, cfg)
        assert info.cycle == cycle_index
        assert info.first_block <= block <= info.last_block
        assert info.blocks_left == info.last_block - block
        assert (info.first_block, info.last_block) == phase_bounds(cycle_index, info.phase, cfg)
        if not seen or seen[-1] != info.phase:
            seen.append(info.phase)
    assert tuple(seen) == PHASES
    bounds = [phase_bounds(cycle_index, name, cfg) for name in PHASES]
    assert bounds[0][0] == start
    assert bounds[-1][1] == start + cfg.cycle_blocks - 1
    assert all(prev[1] + 1 == nxt[0] for prev, nxt in zip(bounds, bounds[1:], strict=False))
    assert phase(start + cfg.cycle_blocks, cfg).cycle == cycle_index + 1


@settings(max_examples=200, deadline=None)
@given(cfg=cycle_configs, block=st.integers(0, 100_000))
def test_phase_of_any_block_is_consistent(cfg: CycleConfig, block: int) -> None:
    """Any block lies inside the phase reported for it, pending exactly before genesis."""
    info = phase(block, cfg)
    assert info.first_block <= block <= info.last_block
    assert info.blocks_left == info.last_block - block >= 0
    if block < cfg.genesis_block:
        assert (info.cycle, info.phase) == (-1, PENDING)
    else:
        assert phase_bounds(info.cycle, info.phase, cfg) == (info.first_block, info.last_block)


# ------------------------------------------------------------------------------------ digests


def _digest(**overrides: object) -> bytes:
    fields: dict = dict(domain="math", cycle=3, global_revision="abc", hotkey="5FHn", tensors_sha256=SHA)
    fields.update(overrides)
    return commit_digest(**fields)


def test_commit_digest_is_32_bytes_and_deterministic() -> None:
    """Same inputs give the same 32-byte digest."""
    assert len(_digest()) == 32
    assert _digest() == _digest()


@pytest.mark.parametrize(
    "override",
    [
        {"domain": "code"},
        {"cycle": 4},
        {"global_revision": "abd"},
        {"hotkey": "5FHo"},
        {"tensors_sha256": hashlib.sha256(b"other").hexdigest()},
        {"format_version": 2},
    ],
)
def test_commit_digest_binds_every_field(override: dict) -> None:
    """Changing any one field changes the digest."""
    assert _digest(**override) != _digest()


def test_commit_digest_does_not_collide_on_shifted_field_boundaries() -> None:
    """Length prefixes keep ("ab", "c") and ("a", "bc") apart, unlike plain concatenation."""
    assert _digest(domain="ab", global_revision="c") != _digest(domain="a", global_revision="c")
    assert _digest(global_revision="ab", hotkey="c") != _digest(global_revision="a", hotkey="bc")
    assert _digest(domain="", global_revision="x") != _digest(domain="x", global_revision="")


@pytest.mark.parametrize("bad", ["", "xyz", SHA[:-2], SHA + "00", SHA[:-1] + "g", " " + SHA[1:]])
def test_commit_digest_rejects_malformed_tensor_sha(bad: str) -> None:
    """tensors_sha256 must be exactly 64 hex chars; the error names the field."""
    with pytest.raises(ConfigError, match="tensors_sha256"):
        _digest(tensors_sha256=bad)


def test_commit_digest_rejects_negative_cycle() -> None:
    """A negative cycle has no canonical encoding and is refused."""
    with pytest.raises(ConfigError, match="cycle"):
        _digest(cycle=-1)


# ------------------------------------------------------------------------------------ eval seed


BLOCK_HASH = "0x" + "ab" * 32


def test_eval_seed_is_deterministic_and_64_bit() -> None:
    """Same inputs give the same seed, an unsigned 64-bit int from the 32-byte digest."""
    seed = eval_seed(seed_block_hash=BLOCK_HASH, domain="math", cycle=1)
    assert seed == eval_seed(seed_block_hash=BLOCK_HASH, domain="math", cycle=1)
    assert 0 <= seed < 2**64
    raw = eval_seed_bytes(seed_block_hash=BLOCK_HASH, domain="math", cycle=1)
    assert len(raw) == 32 and seed == int.from_bytes(raw[:8], "big")


@pytest.mark.parametrize(
    "override",
    [{"seed_block_hash": "0x" + "ab" * 31 + "ac"}, {"domain": "code"}, {"cycle": 2}],
)
def test_eval_seed_changes_with_each_input(override: dict) -> None:
    """A different block hash, domain or cycle gives a different seed."""
    fields: dict = dict(seed_block_hash=BLOCK_HASH, domain="math", cycle=1)
    assert eval_seed(**{**fields, **override}) != eval_seed(**fields)


def test_eval_seed_reads_hash_with_or_without_0x_in_any_case() -> None:
    """The hash is parsed as a value: '0x' prefix and hex case do not change the seed."""
    base = eval_seed(seed_block_hash=BLOCK_HASH, domain="math", cycle=1)
    assert eval_seed(seed_block_hash=BLOCK_HASH[2:], domain="math", cycle=1) == base
    assert eval_seed(seed_block_hash=BLOCK_HASH.upper().replace("0X", "0x"), domain="math", cycle=1) == base


@pytest.mark.parametrize("bad", ["", "0x", "0xabc", "zz" * 32])
def test_eval_seed_rejects_non_hex_block_hash(bad: str) -> None:
    """A block hash that is not hex bytes is refused with the field named."""
    with pytest.raises(ConfigError, match="seed_block_hash"):
        eval_seed(seed_block_hash=bad, domain="math", cycle=1)


# ------------------------------------------------------------------------------------ commitments


def _reveal(**overrides: object) -> RevealPayload:
    fields: dict = dict(
        cycle=7, store_kind="hf", repo="miner-1/connito-math", revision=HF_REV, manifest_digest=b"m" * 16
    )
    fields.update(overrides)
    return RevealPayload(**fields)


def _global(**overrides: object) -> GlobalPayload:
    fields: dict = dict(
        cycle=7, store_kind="local", repo="global", revision="ab" * 32, record_digest=b"r" * 16
    )
    fields.update(overrides)
    return GlobalPayload(**fields)


PAYLOADS = [
    CommitPayload(cycle=0, digest=b"\x00" * 32),
    CommitPayload(cycle=2**32 - 1, digest=_digest()),
    _reveal(),
    _reveal(store_kind="local", revision="ab" * 32, repo="r"),
    _reveal(repo="n" * 81),
    _global(),
    _global(store_kind="hf", revision=HF_REV, repo="owner/global-math"),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_commitment_round_trips(payload: CommitPayload | RevealPayload | GlobalPayload) -> None:
    """Encode then decode returns the same record, within the chain's 128-byte budget."""
    data = encode_commitment(payload)
    assert data.startswith(COMMITMENT_PREFIX + bytes([COMMITMENT_VERSION]))
    assert len(data) <= MAX_COMMITMENT_BYTES
    decoded = decode_commitment(data)
    assert type(decoded) is type(payload)
    assert decoded == payload


def test_reveal_and_global_with_same_fields_decode_to_different_kinds() -> None:
    """The kind byte keeps a miner's reveal apart from the lead validator's global state."""
    reveal = _reveal()
    glob = GlobalPayload(
        cycle=reveal.cycle,
        store_kind=reveal.store_kind,
        repo=reveal.repo,
        revision=reveal.revision,
        record_digest=reveal.manifest_digest,
    )
    assert encode_commitment(reveal) != encode_commitment(glob)
    assert isinstance(decode_commitment(encode_commitment(glob)), GlobalPayload)


def test_hf_reveal_packs_revision_as_raw_bytes() -> None:
    """A 40-hex Hub sha takes 20 bytes, leaving room for an 81-byte repo id."""
    assert max_repo_bytes() == 81
    assert max_repo_bytes(64) == 69
    assert len(encode_commitment(_reveal(repo="n" * 81))) == MAX_COMMITMENT_BYTES


@pytest.mark.parametrize(
    ("payload", "limit"),
    [(_reveal(repo="n" * 82), 81), (_global(repo="n" * 70), 69)],
)
def test_encode_rejects_repo_over_budget(payload: RevealPayload | GlobalPayload, limit: int) -> None:
    """A repo id too long for 128 bytes fails on encode with the field and the limit."""
    with pytest.raises(ConfigError, match=f"repo: .*at most {limit}"):
        encode_commitment(payload)


def test_short_digest_takes_first_16_bytes_of_sha256() -> None:
    """Raw and hex sha256 truncate to the same 16 bytes; anything else is refused."""
    full = hashlib.sha256(b"manifest").digest()
    assert short_digest(full) == full[:16] == short_digest(full.hex())
    with pytest.raises(ConfigError, match="digest"):
        short_digest(full[:16])
    with pytest.raises(ConfigError, match="digest"):
        short_digest("ab")


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: CommitPayload(cycle=1, digest=b"x" * 31), "digest"),
        (lambda: CommitPayload(cycle=-1, digest=b"x" * 32), "cycle"),
        (lambda: CommitPayload(cycle=2**32, digest=b"x" * 32), "cycle"),
        (lambda: CommitPayload(cycle=1, digest="x" * 32), "digest"),
        (lambda: CommitPayload(cycle=1, digest=b"x" * 32, extra=1), "extra"),
        (lambda: _reveal(revision=HF_REV[:-2]), "hf revision"),
        (lambda: _reveal(revision=HF_REV.upper()), "revision"),
        (lambda: _reveal(store_kind="local", revision="abc"), "revision"),
        (lambda: _reveal(store_kind="local", revision="ab" * 33), "revision"),
        (lambda: _reveal(store_kind="s3"), "store_kind"),
        (lambda: _reveal(repo="../etc"), "repo"),
        (lambda: _reveal(repo="a/b/c"), "repo"),
        (lambda: _reveal(repo="a b"), "repo"),
        (lambda: _reveal(repo=""), "repo"),
        (lambda: _reveal(manifest_digest=b"m" * 32), "manifest_digest"),
    ],
)
def test_payload_construction_rejects_invalid_fields(build, field: str) -> None:
    """Each field rule is enforced when the record is built; the error names the field."""
    with pytest.raises(ValidationError, match=field):
        build()


def _valid_reveal_bytes() -> bytes:
    return encode_commitment(_reveal())


def _raw_reveal(*, store: int = 0, revision: bytes = bytes.fromhex(HF_REV), repo: bytes = b"r") -> bytes:
    """A reveal built byte by byte, bypassing the encoder's checks."""
    head = b"cn\x01R" + struct.pack(">IBB", 7, store, len(revision)) + revision + b"m" * 16
    return head + bytes([len(repo)]) + repo


def _with_byte(data: bytes, index: int, value: int) -> bytes:
    return data[:index] + bytes([value]) + data[index + 1 :]


# Offsets in a reveal: 0-1 prefix, 2 version, 3 kind, 4-7 cycle, 8 store, 9 rev_len, 10-29 rev,
# 30-45 digest, 46 repo_len, 47.. repo.
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated: prefix"),
        (b"xx\x01R", "foreign prefix"),
        (b"cn\x02R" + b"\x00" * 10, "unknown version 2"),
        (b"cn\x01Z" + b"\x00" * 10, "unknown kind"),
        (b"cn\x01C" + b"\x00" * 35, "truncated: digest"),
        (b"cn\x01C" + b"\x00" * 37, "1 trailing bytes"),
        (b"\x00" * 129, "longer than 128"),
        (_valid_reveal_bytes()[:-1], "truncated: repo"),
        (_valid_reveal_bytes() + b"!", "trailing"),
        (_with_byte(_valid_reveal_bytes(), 8, 9), "unknown store kind 9"),
        (_raw_reveal(revision=b"\x01" * 19), "hf revision"),
        (_raw_reveal(store=1, revision=b""), "revision"),
        (_raw_reveal(store=1, revision=b"\x01" * 33), "revision"),
        (_raw_reveal(repo=b""), "repo"),
        (_raw_reveal(repo=b"a..b"), "repo"),
        (_with_byte(_valid_reveal_bytes(), 47, 0xFF), "utf-8"),
        (_with_byte(_valid_reveal_bytes(), 47, ord("/")), "repo"),
        (_with_byte(_valid_reveal_bytes(), 47, 0x0A), "repo"),
        ("cn\x01C", "expected bytes"),
        (None, "expected bytes"),
    ],
)
def test_decode_rejects_malformed_commitment(data: bytes, reason: str) -> None:
    """Every malformed commitment fails with CommitmentDecodeError on one line naming the reason."""
    with pytest.raises(CommitmentDecodeError, match=reason) as info:
        decode_commitment(data)
    assert "\n" not in str(info.value)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    """Bytes-like inputs from chain clients decode like bytes."""
    data = _valid_reveal_bytes()
    assert decode_commitment(bytearray(data)) == decode_commitment(memoryview(data)) == _reveal()


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(st.binary(max_size=160), st.binary(max_size=124).map(lambda tail: b"cn\x01" + tail)))
def test_decode_raises_only_commitment_decode_error(data: bytes) -> None:
    """Arbitrary bytes either decode to a payload that re-encodes to the same bytes, or raise
    CommitmentDecodeError; no other exception escapes."""
    try:
        payload = decode_commitment(data)
    except CommitmentDecodeError:
        return
    assert encode_commitment(payload) == data


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["reveal", "global"]),
    cycle=st.integers(0, 2**32 - 1),
    store_kind=st.sampled_from(["hf", "local"]),
    rev_bytes=st.binary(min_size=1, max_size=32),
    repo=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,30}(/[A-Za-z0-9][A-Za-z0-9_-]{0,30})?\Z"),
    digest=st.binary(min_size=16, max_size=16),
)
def test_location_payloads_round_trip(
    kind: str, cycle: int, store_kind: str, rev_bytes: bytes, repo: str, digest: bytes
) -> None:
    """Any valid reveal or global record survives encode then decode unchanged."""
    revision = rev_bytes.hex() if store_kind == "local" else hashlib.sha1(rev_bytes).hexdigest()
    common = dict(cycle=cycle, store_kind=store_kind, repo=repo, revision=revision)
    payload = (
        RevealPayload(**common, manifest_digest=digest)
        if kind == "reveal"
        else GlobalPayload(**common, record_digest=digest)
    )
    assert decode_commitment(encode_commitment(payload)) == payload


def test_commit_payload_wire_layout_is_prefix_version_kind_cycle_digest() -> None:
    """The commit encoding is exactly b"cn" | 0x01 | b"C" | cycle u32 BE | digest (40 bytes)."""
    digest = _digest()
    data = encode_commitment(CommitPayload(cycle=258, digest=digest))
    assert data == b"cn\x01C" + struct.pack(">I", 258) + digest
