"""SubtensorChain: the ``Chain`` protocol over the bittensor 11 SDK.

Rules it keeps:
- every third-party failure leaves as a one-line ``ChainError`` naming the endpoint;
- transport failures (unreachable node, dropped socket, timeout) are retried on a fresh
  connection with bounded exponential backoff, one WARNING line per failure; on-chain refusals and
  writes are never retried (a resubmitted extrinsic has an unknown fate);
- writes are refused client-side, before anything is signed, when the chain's rate limits or
  registration rules would reject them, and the refusal says how many blocks remain.

Reads go through the SDK's typed namespaces (``subnets.metagraph``, ``subnets.commitments``,
``hyperparameters``), weights through the ``SetWeights`` intent (the path ``bt.set_weights`` takes,
which picks plaintext or timelocked commit-reveal itself), and commitments through the raw
``Commitments.set_commitment`` call signed by the hotkey (v11 has no commitment intent). The
pallet's field encoding and byte budget live in ``connito.chain.subtensor_commitments``.

May import: connito.errors, connito.chain.base, connito.chain.subtensor_commitments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import bittensor as bt
from bittensor import calls, storage
from bittensor.intents.weights import SetWeights

from connito.chain.base import ChainParams, Commitment, Neuron
from connito.chain.subtensor_commitments import (
    DEFAULT_MAX_SPACE_BYTES,
    MAX_COMMITMENT_BYTES,
    commit_spacing_blocks,
    commitment_info,
    decode_commitment_fields,
)
from connito.errors import ChainError, ConfigError

__all__ = ["SubtensorChain", "RetryPolicy"]

logger = logging.getLogger(__name__)

_CONNECT_PREFIX = "could not connect to any endpoint: "
# Transport-level failures: worth a fresh connection. RpcPolicyError (HTTP 403/429) is excluded
# on purpose: the node is reachable and asks us to back off, so retrying would amplify it.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bt.RpcConnectionError,
    bt.ConnectionNotReady,
    TimeoutError,
    OSError,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to try before calling the chain unreachable.

    Worst case for one operation is about ``max_attempts`` SDK connect attempts (each bounded by
    the SDK's 10 s websocket handshake per endpoint) plus the backoff sleeps; no new attempt starts
    once ``budget_s`` has passed.
    """

    max_attempts: int = 3
    backoff_s: float = 0.5  # first sleep; doubles after every failure
    budget_s: float = 20.0


class SubtensorChain:
    """A subtensor node seen through the ``Chain`` protocol, bound to one netuid and one hotkey.

    Construction is cold (no network I/O; only the wallet's public hotkey file is read); the first
    call connects. ``substrate`` replaces the SDK's websocket backend with any object implementing
    ``bittensor.Substrate`` (tests inject an in-memory fake; the rest of the SDK runs unchanged).
    """

    def __init__(
        self,
        netuid: int,
        *,
        network: str = "finney",
        wallet: bt.Wallet | None = None,
        substrate: bt.Substrate | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.netuid = netuid
        self._network = network
        self._wallet = wallet
        self._substrate = substrate
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._warned_default_space = False
        try:
            self._client = self._new_client()
        except ValueError as exc:
            raise ConfigError(_one_line(exc), field="subtensor.network") from None
        self.endpoint: str = self._client.endpoint
        self._hotkey = _hotkey_ss58(wallet) if wallet is not None else None

    def __repr__(self) -> str:
        return f"SubtensorChain(netuid={self.netuid}, endpoint={self.endpoint!r}, hotkey={self._hotkey!r})"

    @property
    def hotkey(self) -> str | None:
        """ss58 of the hotkey this chain object writes as (None: read-only)."""
        return self._hotkey

    # Reads ----------------------------------------------------------------------------------

    def current_block(self) -> int:
        """The latest block number.

        Raises:
            ChainError: the node cannot be reached after the retry policy is exhausted.
        """
        return self._call("current_block", lambda client: int(client.block))

    def block_hash(self, block: int) -> str:
        """Hex hash of a block at or below the current block.

        Raises:
            ChainError: the block is in the future, unknown, or cannot be read.
        """

        def read(client: bt.Subtensor) -> str:
            head = int(client.block)
            if not 0 <= block <= head:
                raise self._error(f"block_hash: block {block} is not in 0..{head} (the current block)")
            info = client.block_info(block)
            if info is None or not info.hash:
                raise self._error(f"block_hash: block {block} not found")
            return str(info.hash)

        return self._call("block_hash", read)

    def metagraph(self) -> list[Neuron]:
        """Every registered neuron of the subnet, ordered by uid (stake in the subnet's unit).

        Raises:
            ChainError: the subnet does not exist or the read failed.
        """
        graph = self._call(
            "metagraph", lambda client: client.subnets.metagraph(self.netuid, commitments=False)
        )
        if graph is None:
            raise self._error(f"metagraph: subnet netuid={self.netuid} does not exist")
        return [
            Neuron(
                uid=int(n.uid),
                hotkey=str(n.hotkey),
                stake=float(n.total_stake.amount),
                validator_permit=bool(n.validator_permit),
                registered_block=int(n.block_at_registration or 0),
            )
            for n in sorted(graph.neurons, key=lambda n: n.uid)
        ]

    def commitments(self, block: int | None = None) -> list[Commitment]:
        """The raw commitment of every registered hotkey that has one (now, or at ``block``), by hotkey.

        Commitments left behind by deregistered hotkeys and commitments without a raw field
        (hashes, sealed timelock payloads) are skipped: they are not subnet members' raw bytes.
        A past ``block`` is read from the node's state at that block (a pruning node keeps a few
        hundred blocks; an archive node all).
        """
        rows = self._call("commitments", lambda client: client.subnets.commitments(self.netuid, block=block))
        out: list[Commitment] = []
        for hotkey, record in rows.items():
            if record.uid is None:
                continue
            data = decode_commitment_fields(record.fields)
            if data is None:
                logger.debug(
                    "commitment skipped hotkey=%s block=%d reason=no_raw_field", hotkey, record.block
                )
                continue
            out.append(Commitment(hotkey=str(hotkey), block=int(record.block), data=data))
        return sorted(out, key=lambda c: c.hotkey)

    def params(self) -> ChainParams:
        """Tempo, weights rate limit and commitment spacing of the subnet, read at one block.

        ``commitment_rate_limit`` is derived from the pallet's byte budget (see
        ``commit_spacing_blocks``); if the runtime has no ``Commitments.MaxSpace`` the documented
        default of 3100 bytes is used and a WARNING says so.
        """

        def read(client: bt.Subtensor) -> tuple[int, int, int | None, int]:
            head = int(client.block)  # every read below is pinned to this block
            tempo = int(client.query(storage.SubtensorModule.Tempo, [self.netuid], block=head) or 0)
            weights_rate_limit = int(client.hyperparameters.weights_rate_limit(self.netuid, block=head))
            weights_version = int(
                client.query(storage.SubtensorModule.WeightsVersionKey, [self.netuid], block=head) or 0
            )
            try:
                max_space = client.query(storage.Commitments.MaxSpace, block=head)
            except bt.ChainError:  # an older runtime without the byte budget storage item
                max_space = None
            return tempo, weights_rate_limit, None if max_space is None else int(max_space), weights_version

        tempo, weights_rate_limit, max_space, weights_version = self._call("params", read)
        if max_space is None:
            max_space = DEFAULT_MAX_SPACE_BYTES
            if not self._warned_default_space:
                logger.warning(
                    "chain has no Commitments.MaxSpace endpoint=%s; using documented default max_space_bytes=%d",
                    self.endpoint,
                    DEFAULT_MAX_SPACE_BYTES,
                )
                self._warned_default_space = True
        return ChainParams(
            tempo=tempo,
            weights_rate_limit=weights_rate_limit,
            commitment_rate_limit=commit_spacing_blocks(tempo=tempo, max_space_bytes=max_space),
            weights_version=weights_version,
        )

    # Writes ---------------------------------------------------------------------------------

    def commit(self, data: bytes) -> int:
        """Write this hotkey's raw commitment (at most 128 bytes); returns the block it landed in.

        Raises:
            ChainError: read-only, too long, not registered, rate limited, or refused on chain.
        """
        hotkey = self._require_hotkey("commit")
        where = f"commit hotkey={hotkey} netuid={self.netuid}"
        if len(data) > MAX_COMMITMENT_BYTES:
            raise self._error(
                f"{where}: payload is {len(data)} bytes, at most {MAX_COMMITMENT_BYTES} allowed"
            )
        limit = self.params().commitment_rate_limit

        def check(client: bt.Subtensor) -> tuple[int, int | None]:
            head = int(client.block)
            if client.neurons.uid(hotkey, self.netuid, block=head) is None:
                raise self._error(f"{where}: hotkey is not registered on the subnet")
            last = client.query(storage.Commitments.LastCommitment, [self.netuid, hotkey], block=head)
            return head, None if last is None else int(last)

        head, last = self._call("commit", check)
        if last is not None and head - last < limit:
            raise self._error(
                f"{where}: rate limited, last commitment at block {last}, "
                f"{limit - (head - last)} blocks remaining (limit {limit} blocks)"
            )
        call = calls.Commitments.set_commitment(netuid=self.netuid, info=commitment_info(data))
        result = self._call(
            "commit", lambda client: client.submit_call(call, self._wallet, signer="hotkey"), retry=False
        )
        block = self._landed_block(result, where)
        logger.info(
            "commitment written hotkey=%s netuid=%d block=%d bytes=%d", hotkey, self.netuid, block, len(data)
        )
        return block

    def set_weights(self, weights: dict[int, float], *, version_key: int = 0) -> int:
        """Set this hotkey's weights over uids through the SDK's ``SetWeights`` intent.

        The SDK conforms the vector to the subnet (max-weight clip, u16 quantization) and submits
        plaintext or timelock-encrypted commit-reveal as the subnet requires. ``version_key`` is
        sent as is; the chain refuses one below the subnet's ``WeightsVersionKey``.

        Raises:
            ChainError: read-only, empty, not registered, no validator permit, rate limited, or
                refused on chain (``IncorrectWeightVersionKey`` for an outdated version key).
        """
        hotkey = self._require_hotkey("set_weights")
        where = f"set_weights hotkey={hotkey} netuid={self.netuid}"
        if not weights:
            raise self._error(f"{where}: no weights given")
        limit = self.params().weights_rate_limit

        def check(client: bt.Subtensor) -> tuple[int, bool, int]:
            head = int(client.block)
            uid = client.neurons.uid(hotkey, self.netuid, block=head)
            if uid is None:
                raise self._error(f"{where}: hotkey is not registered on the subnet")
            permits = client.query(storage.SubtensorModule.ValidatorPermit, [self.netuid], block=head) or []
            last_update = client.query(storage.SubtensorModule.LastUpdate, [self.netuid], block=head) or []
            permit = uid < len(permits) and bool(permits[uid])
            last = int(last_update[uid]) if uid < len(last_update) else 0
            return head, permit, last

        head, permit, last = self._call("set_weights", check)
        if not permit:
            raise self._error(f"{where}: hotkey holds no validator permit")
        if last > 0 and head - last < limit:  # the chain treats LastUpdate 0 as "never set"
            raise self._error(
                f"{where}: rate limited, weights last set at block {last}, "
                f"{limit - (head - last)} blocks remaining (limit {limit} blocks)"
            )
        try:
            uids = sorted(weights)
            intent = SetWeights(
                netuid=self.netuid,
                uids=uids,
                weights=[float(weights[u]) for u in uids],
                version_key=version_key,
            )
        except bt.BittensorError as exc:
            raise self._error(f"{where}: {_one_line(exc)}") from exc
        result = self._call(
            "set_weights", lambda client: client.execute(intent, self._wallet, retries=2), retry=False
        )
        block = self._landed_block(result, where)
        logger.info(
            "weights set hotkey=%s netuid=%d block=%d uids=%d", hotkey, self.netuid, block, len(weights)
        )
        return block

    def close(self) -> None:
        """Release the connection and its event-loop thread (also happens at garbage collection)."""
        self._reset_client()

    # Plumbing -------------------------------------------------------------------------------

    def _new_client(self) -> bt.Subtensor:
        # An explicit ws:// endpoint is the operator's choice: pin to it. A named network keeps
        # the SDK's public fallback and archive pools.
        pinned = self._network.startswith(("ws://", "wss://"))
        return bt.Subtensor(
            self._network,
            fallback_endpoints=[] if pinned else None,
            archive_endpoints=[] if pinned else None,
            substrate=self._substrate,
        )

    def _reset_client(self) -> None:
        """Drop the (possibly broken) connection; the next call dials a fresh one."""
        old, self._client = self._client, self._new_client()
        try:
            old.close()
        except (bt.BittensorError, OSError, RuntimeError) as exc:  # closing a dead socket may fail
            logger.debug(
                "closing old chain client failed endpoint=%s error=%s", self.endpoint, _one_line(exc)
            )

    def _call(self, op: str, fn: Callable[[bt.Subtensor], T], *, retry: bool = True) -> T:
        """Run ``fn`` against the client, reconnecting with backoff on transport errors."""
        attempts = self._retry.max_attempts if retry else 1
        delay = self._retry.backoff_s
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return fn(self._client)
            except ChainError:
                raise
            except bt.RpcPolicyError as exc:
                raise self._error(f"{op}: node refused the request: {_one_line(exc)}") from exc
            except (FileNotFoundError, PermissionError) as exc:  # a wallet key file, not the network
                raise self._error(f"{op}: cannot read wallet key: {_one_line(exc)}") from exc
            except _TRANSPORT_ERRORS as exc:
                self._reset_client()
                out_of_time = time.monotonic() - started + delay > self._retry.budget_s
                final = attempt == attempts or out_of_time
                logger.warning(
                    "chain transport error op=%s endpoint=%s attempt=%d/%d next=%s error=%s",
                    op,
                    self.endpoint,
                    attempt,
                    attempts,
                    "give_up" if final else f"retry_in_s={delay:g}",
                    _one_line(exc),
                )
                if final:
                    if not retry:
                        raise self._error(
                            f"{op}: connection lost while submitting, outcome unknown: {_reason(exc)}"
                        ) from exc
                    plural = "s" if attempt > 1 else ""
                    raise self._error(
                        f"cannot reach chain at {self.endpoint}: {_reason(exc)} ({attempt} attempt{plural})"
                    ) from exc
                self._sleep(delay)
                delay *= 2
            except (bt.BittensorError, ValueError) as exc:
                raise self._error(f"{op} failed at {self.endpoint}: {_one_line(exc)}") from exc
        raise AssertionError("retry loop always returns or raises")

    def _landed_block(self, result: bt.ExtrinsicResult, where: str) -> int:
        """The block an accepted extrinsic landed in; a refused one becomes a ChainError."""
        if not result.success:
            raise self._error(f"{where}: chain refused it: {_one_line(result.message or 'no reason given')}")
        block_part = (result.extrinsic_id or "").split("-", 1)[0]
        return int(block_part) if block_part.isdigit() else self.current_block()

    def _require_hotkey(self, op: str) -> str:
        if self._hotkey is None:
            raise self._error(f"{op} netuid={self.netuid}: chain opened read-only (no wallet)")
        return self._hotkey

    def _error(self, message: str) -> ChainError:
        return ChainError(_one_line(message), endpoint=self.endpoint)


def _hotkey_ss58(wallet: bt.Wallet) -> str:
    """The wallet's hotkey address from its public file (never unlocks a key)."""
    try:
        try:
            return str(wallet.hotkeypub.ss58_address)
        except FileNotFoundError:  # legacy wallets have no hotkeypub.txt
            return str(wallet.hotkey.ss58_address)
    except (OSError, bt.BittensorError, ValueError) as exc:
        raise ConfigError(
            f"cannot load hotkey {wallet.hotkey_str!r} of wallet {wallet.name!r} under {wallet.path}: {_one_line(exc)}",
            field="wallet.hotkey",
        ) from None


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _reason(exc: BaseException) -> str:
    """The transport's own words for why it failed, without the SDK's generic prefix."""
    text = _one_line(exc).removeprefix(_CONNECT_PREFIX)
    return text or type(exc).__name__
