"""An in-memory ``bittensor.Substrate`` for testing ``SubtensorChain`` through the real SDK.

bittensor 11's ``Client(substrate=...)`` seam replaces exactly one layer: the websocket
transport, the SCALE codec and the runtime metadata (``RpcSubstrate``). Everything above it runs
unchanged in the tests: ``Subtensor``'s blocking facade and event-loop thread, the read registry
and typed namespaces, the ``Metagraph`` decoder, the ``SetWeights`` intent (preflight, conform,
u16 quantization), the executor's plan/execute path, ``submit_call`` and wallet signing with real
sr25519 keys.

So this fake answers with what ``RpcSubstrate`` would hand up after decoding: storage values and
maps as plain Python values (ss58 strings, ints, dicts, ``0x`` hex for byte fields), the
``SubnetInfoRuntimeApi.get_metagraph`` record as a dict of per-uid columns, and composed calls as
inspectable records. Submitting verifies the extrinsic's signature, lands it in the next block
and applies the few state changes the tests read back (commitments, weights, ``LastUpdate``).
Faults are injected by count: ``fail_connects`` refused connections, ``fail_reads`` dropped
sockets on the next reads, ``refuse_next_submit`` a dispatch error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import bittensor as bt
from bittensor.sp_core import verify

__all__ = ["FakeNeuron", "FakeCall", "Submission", "FakeSubstrate", "fake_block_hash"]

ALPHA_RAO = 10**9  # rao per unit of stake


def fake_block_hash(block: int) -> str:
    """A deterministic 32-byte block hash."""
    return "0x" + hashlib.sha256(f"fake-block-{block}".encode()).hexdigest()


@dataclass
class FakeNeuron:
    """One registered neuron of the fake subnet."""

    hotkey: str
    coldkey: str
    stake_rao: int = 0
    validator_permit: bool = False
    last_update: int = 0
    registered_block: int = 1


@dataclass(frozen=True)
class FakeCall:
    """A composed call: module, function and the params exactly as the SDK built them."""

    module: str
    function: str
    params: dict[str, Any]

    @property
    def data(self) -> bytes:
        """Stand-in for SCALE call bytes: what the signer signs."""
        return repr((self.module, self.function, sorted(self.params.items()))).encode()


@dataclass(frozen=True)
class Submission:
    """One extrinsic the fake accepted (or refused)."""

    call: FakeCall
    signer: str
    block: int
    success: bool


@dataclass
class FakeSubstrate:
    """A one-subnet chain held in dicts; implements the Substrate methods the SDK calls here."""

    netuid: int
    neurons: list[FakeNeuron]
    head: int = 1000
    tempo: int = 360
    weights_rate_limit: int = 100
    weights_version: int = 0  # SubtensorModule.WeightsVersionKey: the minimum set_weights version_key
    max_space: int | None = 3100  # None: the runtime has no Commitments.MaxSpace item
    commit_reveal: bool = False
    fail_connects: int = 0
    fail_reads: int = 0
    refuse_next_submit: str | None = None
    token_symbols: dict[int, str] = field(default_factory=dict)
    connects: int = 0
    composed: list[FakeCall] = field(default_factory=list)
    submissions: list[Submission] = field(default_factory=list)
    weights: dict[int, dict[int, int]] = field(default_factory=dict)  # uid -> {dest: u16}
    commitment_of: dict[str, dict[str, Any]] = field(default_factory=dict)  # hotkey -> record
    last_commitment: dict[str, int] = field(default_factory=dict)

    # Lifecycle ---------------------------------------------------------------------------------

    def balance(self, rao: int, netuid: int = 0) -> bt.Balance:
        return bt.Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        self.connects += 1
        if self.fail_connects > 0:
            self.fail_connects -= 1
            raise bt.RpcConnectionError("could not connect to any endpoint: [Errno 111] Connect call failed")

    async def close(self) -> None:
        return None

    # Reads -------------------------------------------------------------------------------------

    def _maybe_drop(self) -> None:
        if self.fail_reads > 0:
            self.fail_reads -= 1
            raise bt.RpcConnectionError(
                "RPC request failed after exhausting endpoint retries: connection closed"
            )

    async def block_number(self) -> int:
        self._maybe_drop()
        return self.head

    async def finalized_block_number(self) -> int:
        return self.head

    async def block_hash(self, block: int | None = None) -> str:
        return fake_block_hash(self.head if block is None else block)

    async def block_time(self) -> float:
        return 12.0

    async def spec_version(self) -> int:
        return 300

    async def get_block(self, block_number: int | None = None, block_hash: str | None = None) -> dict | None:
        number = self.head if block_number is None else block_number
        if number > self.head:
            return None
        timestamp = {
            "call": {
                "call_module": "Timestamp",
                "call_function": "set",
                "call_args": [{"name": "now", "value": 1_700_000_000_000 + 12_000 * number}],
            }
        }
        header = {
            "number": number,
            "hash": fake_block_hash(number),
            "parentHash": fake_block_hash(number - 1),
        }
        return {"header": header, "extrinsics": [timestamp]}

    async def query(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> Any:
        self._maybe_drop()
        key = (module, storage_function)
        args = list(params or [])
        if key == ("Commitments", "MaxSpace"):
            if self.max_space is None:
                raise bt.ChainError("Storage function Commitments.MaxSpace not found")
            return self.max_space
        if args and args[0] != self.netuid and module == "SubtensorModule":
            return None
        if key == ("SubtensorModule", "Uids"):
            return self._uid(args[1])
        if key == ("Commitments", "LastCommitment"):
            return self.last_commitment.get(args[1])
        if key == ("Commitments", "CommitmentOf"):
            return self.commitment_of.get(args[1])
        scalar = {
            ("SubtensorModule", "Tempo"): self.tempo,
            ("SubtensorModule", "WeightsSetRateLimit"): self.weights_rate_limit,
            ("SubtensorModule", "WeightsVersionKey"): self.weights_version,
            ("SubtensorModule", "CommitRevealWeightsEnabled"): self.commit_reveal,
            ("SubtensorModule", "MinAllowedWeights"): 1,
            ("SubtensorModule", "MaxWeightsLimit"): 65535,
            ("SubtensorModule", "SubnetEpochConsensus"): "Yuma",
            ("SubtensorModule", "ValidatorPermit"): [n.validator_permit for n in self.neurons],
            ("SubtensorModule", "LastUpdate"): [n.last_update for n in self.neurons],
            # epoch schedule, read by the timelocked commit-reveal path
            ("SubtensorModule", "RevealPeriodEpochs"): 1,
            ("SubtensorModule", "LastEpochBlock"): self.head - 10,
            ("SubtensorModule", "PendingEpochAt"): 0,
            ("SubtensorModule", "SubnetEpochIndex"): self.head // (self.tempo + 1),
            ("SubtensorModule", "BlocksSinceLastStep"): 10,
        }
        if key in scalar:
            return scalar[key]
        raise AssertionError(f"fake substrate: unexpected query {module}.{storage_function}{args}")

    async def query_map(
        self, module: str, storage_function: str, params: list | None = None, block_hash: str | None = None
    ) -> list[tuple[Any, Any]]:
        self._maybe_drop()
        key = (module, storage_function)
        if key == ("SubtensorModule", "TokenSymbol"):
            return [(self.netuid, "0x" + "α".encode().hex())]
        if key == ("Commitments", "CommitmentOf"):
            return list(self.commitment_of.items())
        if key == ("Commitments", "RevealedCommitments"):
            return []
        if key == ("SubtensorModule", "Uids"):
            return [(n.hotkey, uid) for uid, n in enumerate(self.neurons)]
        raise AssertionError(f"fake substrate: unexpected query_map {module}.{storage_function}")

    async def runtime_call(self, api: str, method: str, params: list, block_hash: str | None = None) -> Any:
        self._maybe_drop()
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph"):
            raise AssertionError(f"fake substrate: unexpected runtime call {api}.{method}")
        if params != [self.netuid]:
            return None
        return self._metagraph_record()

    async def constant(self, module: str, name: str) -> Any:
        if (module, name) == ("Aura", "SlotDuration"):
            return 12_000
        raise AssertionError(f"fake substrate: unexpected constant {module}.{name}")

    # Calls and submission ---------------------------------------------------------------------

    async def compose(self, call: Any) -> FakeCall:
        module, function, params = call
        composed = FakeCall(module=module, function=function, params=dict(params))
        self.composed.append(composed)
        return composed

    async def estimate_fee(self, call: Any, keypair: Any) -> bt.Balance:
        return bt.Balance.from_rao(0)

    async def account_next_index(self, address: str) -> int:
        return 0

    async def submit(
        self,
        call: FakeCall,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = None,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> bt.ExtrinsicResult:
        signature = bytes(keypair.sign(call.data))
        if not verify(call.data, signature, keypair.ss58_address):
            raise AssertionError("fake substrate: bad signature")
        self.head += 1  # the extrinsic lands in the next block
        refusal = self.refuse_next_submit or self._apply(call, keypair.ss58_address)
        self.refuse_next_submit = None
        self.submissions.append(
            Submission(call=call, signer=keypair.ss58_address, block=self.head, success=refusal is None)
        )
        if refusal is not None:
            return bt.ExtrinsicResult(
                success=False,
                message=refusal,
                block_hash=fake_block_hash(self.head),
                error=bt.ChainError(refusal),
            )
        return bt.ExtrinsicResult(
            success=True,
            message="Success",
            block_hash=fake_block_hash(self.head),
            extrinsic_id=f"{self.head}-0001",
        )

    # State --------------------------------------------------------------------------------------

    def _uid(self, hotkey: str) -> int | None:
        return next((uid for uid, n in enumerate(self.neurons) if n.hotkey == hotkey), None)

    def _apply(self, call: FakeCall, signer: str) -> str | None:
        """Apply an accepted extrinsic; returns the dispatch error name if the chain would refuse it."""
        uid = self._uid(signer)
        if (call.module, call.function) == ("Commitments", "set_commitment"):
            if uid is None:
                return "AccountNotAllowedCommit"
            fields = [
                {variant: "0x" + bytes(value).hex() for variant, value in entry.items()}
                for entry in call.params["info"]["fields"]
            ]
            self.commitment_of[signer] = {"deposit": 0, "block": self.head, "info": {"fields": fields}}
            self.last_commitment[signer] = self.head
            return None
        if call.module == "SubtensorModule" and call.function in (
            "set_mechanism_weights",
            "commit_timelocked_mechanism_weights",
        ):
            if uid is None:
                return "HotKeyNotRegisteredInSubNet"
            if call.function == "set_mechanism_weights":
                if int(call.params["version_key"]) < self.weights_version:
                    return "IncorrectWeightVersionKey"
                self.weights[uid] = dict(zip(call.params["dests"], call.params["weights"], strict=True))
            self.neurons[uid].last_update = self.head
            return None
        raise AssertionError(f"fake substrate: unexpected extrinsic {call.module}.{call.function}")

    def _metagraph_record(self) -> dict[str, Any]:
        """The decoded ``get_metagraph`` record: subnet fields plus one column per neuron field."""
        count = len(self.neurons)
        return {
            "netuid": self.netuid,
            "name": list(b"fake"),
            "symbol": list("α".encode()),
            "block": self.head,
            "tempo": self.tempo,
            "last_step": self.head - 10,
            "blocks_since_last_step": 10,
            "owner_hotkey": self.neurons[0].hotkey,
            "owner_coldkey": self.neurons[0].coldkey,
            "network_registered_at": 1,
            "num_uids": count,
            "max_uids": 256,
            "hotkeys": [n.hotkey for n in self.neurons],
            "coldkeys": [n.coldkey for n in self.neurons],
            "active": [True] * count,
            "validator_permit": [n.validator_permit for n in self.neurons],
            "last_update": [n.last_update for n in self.neurons],
            "block_at_registration": [n.registered_block for n in self.neurons],
            "total_stake": [n.stake_rao for n in self.neurons],
            "alpha_stake": [n.stake_rao for n in self.neurons],
            "tao_stake": [0] * count,
            "emission": [0] * count,
            "axons": [{"ip": 0, "port": 0, "ip_type": 4}] * count,
        }
