"""SubtensorChain through the real bittensor 11 SDK, with only its substrate transport faked.

See ``tests/fake_substrate.py`` for exactly what is replaced (websocket, SCALE codec, runtime
metadata) and what runs for real (Subtensor facade, reads, Metagraph decoding, SetWeights intent,
executor, submit_call, sr25519 signing with a wallet created offline).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import bittensor as bt
import pytest
from bittensor.sp_core import Keypair
from fake_substrate import ALPHA_RAO, FakeCall, FakeNeuron, FakeSubstrate, fake_block_hash
from hypothesis import given
from hypothesis import strategies as st

from connito.chain import Chain, ChainParams, Commitment, Neuron
from connito.chain.subtensor import RetryPolicy, SubtensorChain
from connito.chain.subtensor_commitments import (
    MAX_COMMITMENT_BYTES,
    commit_spacing_blocks,
    commitment_info,
    decode_commitment_fields,
)
from connito.errors import ChainError, ConfigError

NETUID = 7
ENDPOINT = "ws://127.0.0.1:9944"
BOB = Keypair.create_from_uri("//Bob").ss58_address
CHARLIE = Keypair.create_from_uri("//Charlie").ss58_address


@pytest.fixture(autouse=True)
def _sdk_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK caches token symbols on connect; keep that file inside the test's tmp_path."""
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "token_symbols.json"))


@pytest.fixture
def wallet(tmp_path: Path) -> bt.Wallet:
    """A real sr25519 wallet, created offline without printing its mnemonic."""
    wallet = bt.Wallet("validator", "default", path=str(tmp_path / "wallets"))
    wallet.create_new_coldkey(use_password=False, on_mnemonic=lambda _: None)
    wallet.create_new_hotkey(use_password=False, on_mnemonic=lambda _: None)
    return wallet


@pytest.fixture
def fake(wallet: bt.Wallet) -> FakeSubstrate:
    """Subnet 7: the wallet's hotkey validates (uid 0); Bob mines (uid 1); Charlie validates (uid 2)."""
    hotkey = wallet.hotkeypub.ss58_address
    return FakeSubstrate(
        netuid=NETUID,
        neurons=[
            FakeNeuron(
                hotkey=hotkey,
                coldkey=wallet.coldkeypub.ss58_address,
                stake_rao=100 * ALPHA_RAO,
                validator_permit=True,
            ),
            FakeNeuron(hotkey=BOB, coldkey=BOB, stake_rao=ALPHA_RAO // 2, registered_block=57),
            FakeNeuron(hotkey=CHARLIE, coldkey=CHARLIE, stake_rao=40 * ALPHA_RAO, validator_permit=True),
        ],
    )


class _Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> _Sleeps:
    return _Sleeps()


def _chain(fake: FakeSubstrate, netuid: int = NETUID, **kwargs: Any) -> SubtensorChain:
    """A SubtensorChain whose SDK client talks to the fake (a partial Substrate, hence the cast)."""
    return SubtensorChain(netuid, network=ENDPOINT, substrate=cast(bt.Substrate, fake), **kwargs)


@pytest.fixture
def chain(fake: FakeSubstrate, wallet: bt.Wallet, sleeps: _Sleeps):
    chain = _chain(fake, wallet=wallet, sleep=sleeps)
    yield chain
    chain.close()


def test_subtensor_chain_satisfies_chain_protocol(chain: SubtensorChain, wallet: bt.Wallet) -> None:
    assert isinstance(chain, Chain)
    assert chain.hotkey == wallet.hotkeypub.ss58_address
    assert chain.endpoint == ENDPOINT


def test_metagraph_decodes_runtime_record_into_neurons_by_uid(
    chain: SubtensorChain, wallet: bt.Wallet
) -> None:
    assert chain.metagraph() == [
        Neuron(
            uid=0,
            hotkey=wallet.hotkeypub.ss58_address,
            stake=100.0,
            validator_permit=True,
            registered_block=1,
        ),
        Neuron(uid=1, hotkey=BOB, stake=0.5, validator_permit=False, registered_block=57),
        Neuron(uid=2, hotkey=CHARLIE, stake=40.0, validator_permit=True, registered_block=1),
    ]


def test_metagraph_of_missing_subnet_is_chain_error(fake: FakeSubstrate, wallet: bt.Wallet) -> None:
    chain = _chain(fake, NETUID + 1, wallet=wallet)
    with pytest.raises(ChainError, match="netuid=8 does not exist"):
        chain.metagraph()
    chain.close()


def test_current_block_and_block_hash_come_from_the_chain(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    assert chain.current_block() == fake.head
    assert chain.block_hash(fake.head - 5) == fake_block_hash(fake.head - 5)


def test_block_hash_of_future_block_is_refused(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    with pytest.raises(ChainError, match=f"block {fake.head + 1} is not in 0..{fake.head}"):
        chain.block_hash(fake.head + 1)


def test_commit_submits_raw_set_commitment_signed_by_hotkey(
    chain: SubtensorChain, fake: FakeSubstrate, wallet: bt.Wallet
) -> None:
    """The exact call the SDK builds: Commitments.set_commitment(netuid, one Raw{n} field of the bytes)."""
    payload = b"\x00\xffconnito\x80"
    block = chain.commit(payload)
    (submission,) = fake.submissions
    assert submission.call == FakeCall(
        module="Commitments",
        function="set_commitment",
        params={"netuid": NETUID, "info": {"fields": [{"Raw10": payload}]}},
    )
    assert submission.signer == wallet.hotkeypub.ss58_address
    assert block == submission.block == fake.head


def test_commitments_read_back_exact_bytes_and_block(
    chain: SubtensorChain, fake: FakeSubstrate, wallet: bt.Wallet
) -> None:
    payload = bytes(range(256))[:MAX_COMMITMENT_BYTES]  # not valid utf-8: must survive as bytes
    block = chain.commit(payload)
    assert chain.commitments() == [
        Commitment(hotkey=wallet.hotkeypub.ss58_address, block=block, data=payload)
    ]


def test_commitments_at_a_past_block_are_read_at_that_block_hash(
    chain: SubtensorChain, fake: FakeSubstrate, wallet: bt.Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validator that missed the commit window reads the commitments as they stood then: the
    SDK must query the node's state at that block's hash, not the head's."""
    block = chain.commit(b"commit")
    seen: list[str | None] = []
    original = fake.query_map

    async def recording(module, storage_function, params=None, block_hash=None):
        if (module, storage_function) == ("Commitments", "CommitmentOf"):
            seen.append(block_hash)
        return await original(module, storage_function, params, block_hash)

    monkeypatch.setattr(fake, "query_map", recording)
    assert [c.data for c in chain.commitments(block=block)] == [b"commit"]
    assert seen == [fake_block_hash(block)]


def test_commitments_skip_deregistered_and_non_raw_records(
    chain: SubtensorChain, fake: FakeSubstrate
) -> None:
    fake.commitment_of["5Gone"] = {"deposit": 0, "block": 5, "info": {"fields": [{"Raw2": "0x0102"}]}}
    fake.commitment_of[BOB] = {"deposit": 0, "block": 6, "info": {"fields": [{"Sha256": "0x" + "11" * 32}]}}
    fake.commitment_of[CHARLIE] = {"deposit": 0, "block": 7, "info": {"fields": [{"Raw3": "0x616263"}]}}
    assert chain.commitments() == [Commitment(hotkey=CHARLIE, block=7, data=b"abc")]


def test_commit_over_128_bytes_is_refused_before_signing(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    with pytest.raises(ChainError, match="129 bytes, at most 128"):
        chain.commit(b"x" * (MAX_COMMITMENT_BYTES + 1))
    assert fake.submissions == []


def test_second_commit_within_spacing_reports_blocks_remaining(
    chain: SubtensorChain, fake: FakeSubstrate
) -> None:
    first = chain.commit(b"one")
    fake.head = first + 3
    spacing = commit_spacing_blocks(tempo=fake.tempo, max_space_bytes=3100)
    with pytest.raises(ChainError, match=f"{spacing - 3} blocks remaining"):
        chain.commit(b"two")
    assert len(fake.submissions) == 1
    fake.head = first + spacing
    assert chain.commit(b"two") == first + spacing + 1


def test_commit_refused_on_chain_is_chain_error(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    fake.refuse_next_submit = "SpaceLimitExceeded"
    with pytest.raises(ChainError, match="chain refused it: SpaceLimitExceeded") as info:
        chain.commit(b"abc")
    assert info.value.endpoint == ENDPOINT


def test_commit_by_unregistered_hotkey_is_refused_before_signing(
    fake: FakeSubstrate, wallet: bt.Wallet
) -> None:
    fake.neurons.pop(0)
    chain = _chain(fake, wallet=wallet)
    with pytest.raises(ChainError, match="not registered"):
        chain.commit(b"abc")
    assert fake.submissions == []
    chain.close()


def test_set_weights_submits_quantized_mechanism_weights(
    chain: SubtensorChain, fake: FakeSubstrate, wallet: bt.Wallet
) -> None:
    """The SDK's SetWeights path: max-upscaled u16 values on the plaintext extrinsic."""
    block = chain.set_weights({1: 0.75, 2: 0.25})
    (submission,) = fake.submissions
    assert submission.call == FakeCall(
        module="SubtensorModule",
        function="set_mechanism_weights",
        params={"netuid": NETUID, "mecid": 0, "dests": [1, 2], "weights": [65535, 21845], "version_key": 0},
    )
    assert submission.signer == wallet.hotkeypub.ss58_address
    assert fake.weights[0] == {1: 65535, 2: 21845}
    assert block == fake.head


def test_set_weights_with_commit_reveal_submits_timelocked_commit(
    chain: SubtensorChain, fake: FakeSubstrate
) -> None:
    fake.commit_reveal = True
    chain.set_weights({1: 1.0})
    (submission,) = fake.submissions
    assert (submission.call.module, submission.call.function) == (
        "SubtensorModule",
        "commit_timelocked_mechanism_weights",
    )
    assert submission.call.params["netuid"] == NETUID
    assert submission.call.params["reveal_round"] > 0
    assert fake.weights == {}  # nothing readable until the chain reveals it


def test_set_weights_within_rate_limit_reports_blocks_remaining(
    chain: SubtensorChain, fake: FakeSubstrate
) -> None:
    fake.neurons[0].last_update = fake.head - 10
    with pytest.raises(ChainError, match="90 blocks remaining"):
        chain.set_weights({1: 1.0})
    assert fake.submissions == []


def test_set_weights_without_validator_permit_is_refused(fake: FakeSubstrate, wallet: bt.Wallet) -> None:
    fake.neurons[0].validator_permit = False
    chain = _chain(fake, wallet=wallet)
    with pytest.raises(ChainError, match="no validator permit"):
        chain.set_weights({1: 1.0})
    assert fake.submissions == []
    chain.close()


def test_read_only_chain_refuses_writes(fake: FakeSubstrate) -> None:
    chain = _chain(fake)
    assert chain.hotkey is None
    with pytest.raises(ChainError, match="read-only"):
        chain.commit(b"abc")
    with pytest.raises(ChainError, match="read-only"):
        chain.set_weights({1: 1.0})
    chain.close()


def test_params_read_tempo_rate_limit_and_commit_spacing(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    fake.tempo, fake.weights_rate_limit, fake.max_space = 99, 50, 1280
    # 1280 // 128 = 10 writes per 100-block epoch -> one every 10 blocks
    assert chain.params() == ChainParams(tempo=99, weights_rate_limit=50, commitment_rate_limit=10)


def test_params_fall_back_to_documented_max_space_with_warning(
    chain: SubtensorChain, fake: FakeSubstrate, caplog: pytest.LogCaptureFixture
) -> None:
    fake.tempo, fake.max_space = 99, None
    with caplog.at_level(logging.WARNING, logger="connito.chain.subtensor"):
        params = chain.params()
    assert params.commitment_rate_limit == commit_spacing_blocks(tempo=99, max_space_bytes=3100) == 5
    assert "using documented default max_space_bytes=3100" in caplog.text


def test_transport_errors_reconnect_with_exponential_backoff(
    chain: SubtensorChain, fake: FakeSubstrate, sleeps: _Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_connects = 2
    with caplog.at_level(logging.WARNING, logger="connito.chain.subtensor"):
        assert chain.current_block() == fake.head
    assert sleeps == [0.5, 1.0]
    assert fake.connects == 3  # a fresh connection per attempt
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(ENDPOINT in r.getMessage() for r in warnings)


def test_dropped_connection_mid_session_is_redialed(
    chain: SubtensorChain, fake: FakeSubstrate, sleeps: _Sleeps
) -> None:
    assert chain.current_block() == fake.head
    fake.fail_reads = 1
    assert chain.current_block() == fake.head
    assert sleeps == [0.5] and fake.connects == 2


def test_unreachable_chain_is_one_line_chain_error_naming_endpoint(
    chain: SubtensorChain, fake: FakeSubstrate, sleeps: _Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_connects = 100
    with (
        caplog.at_level(logging.WARNING, logger="connito.chain.subtensor"),
        pytest.raises(ChainError) as info,
    ):
        chain.current_block()
    message = str(info.value)
    assert message == f"cannot reach chain at {ENDPOINT}: [Errno 111] Connect call failed (3 attempts)"
    assert info.value.endpoint == ENDPOINT
    assert isinstance(info.value.__cause__, bt.RpcConnectionError)
    assert sleeps == [0.5, 1.0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


def test_retry_policy_bounds_attempts(fake: FakeSubstrate, sleeps: _Sleeps) -> None:
    fake.fail_connects = 100
    chain = _chain(fake, retry=RetryPolicy(max_attempts=1), sleep=sleeps)
    with pytest.raises(ChainError, match=r"\(1 attempt\)$"):
        chain.current_block()
    assert sleeps == [] and fake.connects == 1
    chain.close()


def test_unknown_network_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="subtensor.network"):
        SubtensorChain(NETUID, network="mainnet-typo")


@given(st.binary(max_size=MAX_COMMITMENT_BYTES))
def test_commitment_fields_round_trip_as_the_chain_returns_them(data: bytes) -> None:
    """Encode for the call, store as the decoder hands it up (0x-hex), decode: same bytes."""
    (field,) = commitment_info(data)["fields"]
    ((variant, value),) = field.items()
    assert variant == f"Raw{len(data)}"
    assert decode_commitment_fields([{variant: "0x" + value.hex()}]) == data
    assert decode_commitment_fields([[{variant: tuple(value)}]]) == data  # tuple-wrapped legacy shape


def test_commitment_without_raw_field_decodes_to_none() -> None:
    assert decode_commitment_fields([{"Sha256": "0x" + "00" * 32}, "ResetBondsFlag"]) is None
    assert decode_commitment_fields([{"Raw2": "0xzz"}]) is None


def test_params_read_the_subnets_weights_version(chain: SubtensorChain, fake: FakeSubstrate) -> None:
    """``WeightsVersionKey`` is read with the other hyperparameters (the owner's upgrade lever)."""
    fake.weights_version = 3
    assert chain.params().weights_version == 3


def test_set_weights_sends_the_version_key_and_an_outdated_one_is_refused(
    chain: SubtensorChain, fake: FakeSubstrate
) -> None:
    """The version key reaches the extrinsic; below the subnet's weights_version the chain refuses it."""
    fake.weights_version = 2
    with pytest.raises(ChainError, match="IncorrectWeightVersionKey"):
        chain.set_weights({1: 1.0}, version_key=1)
    fake.head += 200  # past the rate limit the refused attempt does not consume, to be safe
    chain.set_weights({1: 1.0}, version_key=2)
    assert [s.call.params["version_key"] for s in fake.submissions] == [1, 2]
    assert [s.success for s in fake.submissions] == [False, True]
