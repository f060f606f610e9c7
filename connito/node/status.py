"""``connito status``: why a hotkey got the score it got in a cycle, from public data only.

"Why is my score 0?" is answered the way a validator would answer it, by doing what it did: the
chain's commitments give the commit and the reveal, the store gives the revealed checkpoint, the
domain config and the seed block give the evaluation sample, and a shadow validator (the real
``Validator``, in a scratch workdir, with a chain it cannot write to) re-runs every check and the
Proof-of-Loss scoring for the cycle. Validation is deterministic, so its verdict (accepted or the
rejection reason, rank, this cycle's weight) is the honest validators' verdict. Two rules look
back: a submission may not replay an update accepted (or a merge adopted) in the last
``scoring.replay_cycles`` cycles, and its step length comes from the previous cycle's accepted
updates. So the shadow first evaluates those earlier cycles, in order, adopting each published
global as a validator does; that history is exactly what a validator held. Validators that score
on private evaluation data (``--eval.private-data``) measure Proof-of-Loss on samples nobody else
sees: the shadow measures on the public split, so its losses (and, for close miners, the order)
can differ from theirs, while every check that decides acceptance needs no private data.
The chain adds the weights validators set; the published merge record says whether the
submission was merged and with what weight.

On the embedded chain every commitment ever written is readable, so any cycle whose files are
still in the store can be explained; on subtensor only the current commitments are, so ask
about the cycle that just ended.

May import: connito.node (context, validator), connito.protocol, connito.chain, connito.hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from connito.chain.base import Chain, ChainParams, Commitment, Neuron
from connito.errors import ChainError, InvalidSubmission, StoreError
from connito.hub.base import StoreRef
from connito.node.context import NodeContext
from connito.node.validator_state import submission_scores
from connito.protocol.merge import MERGE_RECORD_FILE, MergeRecord
from connito.protocol.publication import chosen_publication
from connito.protocol.submissions import observe_commitments
from connito.protocol.weights import ranked

__all__ = [
    "SubmissionStatus",
    "explain_submission",
    "explain_submissions",
    "add_status_parser",
    "run_status",
    "format_status",
]

_RECORD_MAX_BYTES = 1 << 20


class SubmissionStatus(BaseModel):
    """What the validators decided about one hotkey's submission in one cycle, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hotkey: str
    cycle: int
    uid: int | None
    committed: bool
    revealed: bool
    accepted: bool
    reason: str | None  # the rejection reason validators record (docs/security.md), None if accepted
    detail: str = ""
    domain_loss: float | None = None
    global_domain_loss: float | None = None
    rank: int | None = None  # 1 = best accepted submission of the cycle
    cycle_weight: float = 0.0  # this cycle's weight from rank, before the EMA
    chain_weights: dict[str, float] = {}  # validator hotkey -> normalised weight on this uid now
    merged: bool | None = None  # None: no merge record published for the cycle (yet)
    merge_weight: float | None = None
    publisher: str | None = None


class _ReadOnlyHistory:
    """A chain view for the shadow validator: every commitment ever written, and no writes."""

    def __init__(self, chain: Chain) -> None:
        self._chain = chain

    @property
    def hotkey(self) -> str | None:
        return None

    def current_block(self) -> int:
        return self._chain.current_block()

    def block_hash(self, block: int) -> str:
        return self._chain.block_hash(block)

    def metagraph(self) -> list[Neuron]:
        return self._chain.metagraph()

    def commitments(self, block: int | None = None) -> list[Commitment]:
        if block is not None:  # the state at a window's end, as a validator reads it back
            return self._chain.commitments(block=block)
        history = getattr(self._chain, "commitment_history", None)  # LocalChain keeps every write
        return list(history()) if callable(history) else self._chain.commitments()

    def params(self) -> ChainParams:
        return self._chain.params()

    def commit(self, data: bytes) -> int:
        raise ChainError("connito status never writes to the chain")

    def set_weights(self, weights: dict[int, float], *, version_key: int = 0) -> int:
        raise ChainError("connito status never writes to the chain")


def explain_submission(
    ctx: NodeContext, hotkey: str, cycle: int, *, history_cycles: int | None = None
) -> SubmissionStatus:
    """Re-run the cycle's evaluation as a validator and read the hotkey's verdict.

    ``ctx`` is a node context whose chain is only read and whose workdir is scratch space.
    ``history_cycles`` earlier cycles (default ``scoring.replay_cycles``) are evaluated first,
    so that the replay check and the step length see what a validator saw.

    Raises:
        ChainError, StoreError: the chain or the store cannot be read.
    """
    return explain_submissions(ctx, [hotkey], cycle, history_cycles=history_cycles)[0]


def explain_submissions(
    ctx: NodeContext, hotkeys: list[str], cycle: int, *, history_cycles: int | None = None
) -> list[SubmissionStatus]:
    """``explain_submission`` for several hotkeys from one replay (an operator with many miners)."""
    from connito.node.validator import Validator  # loads the model stack only when asked

    chain = _ReadOnlyHistory(ctx.chain)
    shadow_ctx = dataclasses.replace(ctx, chain=chain, hotkey="status-shadow", keep_cycles=None)
    neurons = chain.metagraph()
    validators = {n.hotkey for n in neurons if n.validator_permit}
    shadow = Validator(shadow_ctx, progress_bars=False)
    observe_commitments(shadow.state.observed, chain.commitments(), ctx.config, ignore=validators)
    lookback = ctx.config.scoring.replay_cycles if history_cycles is None else history_cycles
    for earlier in range(max(0, cycle - lookback), cycle):
        shadow.evaluate(earlier)  # accepted updates and adopted merges: the validator's history
    shadow.evaluate(cycle)
    result = shadow.state.results[cycle]
    order = [s.hotkey for s in ranked(submission_scores(result))]
    record, publisher = _published_merge(ctx, chain, cycle)  # read once for every hotkey asked
    weights = _weights_by_validator(ctx.chain, neurons)
    statuses = []
    for hotkey in hotkeys:
        observation = shadow.state.observed.get(cycle, {}).get(hotkey)
        row = next((r for r in result.scores if r.hotkey == hotkey), None)
        merge_weight = next((i.weight for i in record.inputs if i.hotkey == hotkey), None) if record else None
        uid = next((n.uid for n in neurons if n.hotkey == hotkey), None)
        statuses.append(
            SubmissionStatus(
                hotkey=hotkey,
                cycle=cycle,
                uid=uid,
                committed=observation is not None and observation.commit_digest is not None,
                revealed=observation is not None and observation.reveal_revision is not None,
                accepted=row is not None and row.accepted,
                reason=None if row is not None and row.accepted else (row.reason if row else "no_commit"),
                detail=row.detail if row else "no commitment of this hotkey was found for the cycle",
                domain_loss=row.domain_loss if row else None,
                global_domain_loss=result.global_domain_loss,
                rank=order.index(hotkey) + 1 if hotkey in order else None,
                cycle_weight=result.cycle_weights.get(hotkey, 0.0),
                chain_weights={} if uid is None else {v: on.get(uid, 0.0) for v, on in weights.items()},
                merged=None if record is None else merge_weight is not None,
                merge_weight=merge_weight,
                publisher=publisher,
            )
        )
    return statuses


def _weights_by_validator(chain: Chain, neurons: list[Neuron]) -> dict[str, dict[int, float]]:
    """Each validator's current weight row by its hotkey (the embedded chain exposes weights; else empty)."""
    weights = getattr(chain, "weights", None)
    if not callable(weights):
        return {}
    by_uid = {n.uid: n.hotkey for n in neurons}
    return {by_uid.get(v, str(v)): row for v, row in sorted(weights().items())}


def _published_merge(
    ctx: NodeContext, chain: _ReadOnlyHistory, cycle: int
) -> tuple[MergeRecord | None, str | None]:
    """The cycle's published merge record and its publisher; (None, publisher) when unreadable."""
    found = chosen_publication(chain, ctx.config.cycle, newer_than=cycle - 1, before=cycle + 1)
    if found is None or found.payload.cycle != cycle:
        return None, None
    ref = StoreRef(kind=found.payload.store_kind, repo=found.payload.repo, revision=found.payload.revision)
    with tempfile.TemporaryDirectory(prefix="connito-status-") as scratch:
        try:
            ctx.store.download(ref, Path(scratch), max_bytes=_RECORD_MAX_BYTES, files=(MERGE_RECORD_FILE,))
            record = MergeRecord.model_validate_json((Path(scratch) / MERGE_RECORD_FILE).read_bytes())
        except (StoreError, InvalidSubmission, ValidationError, OSError):
            return None, found.hotkey
    return record, found.hotkey


def format_status(status: SubmissionStatus) -> str:
    """The human answer, one fact per line, the verdict first."""
    verdict = "accepted" if status.accepted else f"rejected: {status.reason}"
    lines = [f"hotkey={status.hotkey} uid={status.uid} cycle={status.cycle}: {verdict}"]
    if status.detail:
        lines.append(f"  why: {status.detail}")
    lines.append(f"  committed={status.committed} revealed={status.revealed}")
    if status.domain_loss is not None:
        lines.append(
            f"  loss={status.domain_loss:.6f} global={status.global_domain_loss or float('nan'):.6f}"
        )
    lines.append(f"  rank={status.rank} cycle_weight={status.cycle_weight:.4f}")
    for validator, weight in status.chain_weights.items():
        lines.append(f"  weight on chain from validator={validator}: {weight:.4f}")
    merged = "no merge record published" if status.merged is None else f"merged={status.merged}"
    lines.append(f"  {merged}" + (f" merge_weight={status.merge_weight:.4f}" if status.merge_weight else ""))
    return "\n".join(lines)


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="explain a hotkey's verdict in a cycle by replaying the validators' checks"
    )
    p.add_argument("--config", required=True, type=Path, help="domain YAML")
    p.add_argument("--selection", required=True, type=Path, help="the domain's SELECTION.json")
    p.add_argument(
        "--hotkey", required=True, action="append", help="ss58 of a miner hotkey to explain (repeatable)"
    )
    p.add_argument("--cycle", required=True, type=int, help="the cycle to explain")
    p.add_argument("--chain", required=True, help="local:PATH (a local ledger) or a subtensor network/URL")
    p.add_argument("--netuid", type=int, default=None, help="subnet (default: the YAML's netuid)")
    p.add_argument("--hub", default="hf", help="hf (the Hugging Face Hub) or local:PATH (default hf)")
    p.add_argument("--model-path", type=Path, default=None, help="base model folder (default: the config's)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument(
        "--data-cache", type=Path, default=None, help="data and tokenizer cache (default: WORKDIR/cache)"
    )
    p.add_argument(
        "--history",
        type=int,
        default=None,
        help="earlier cycles to evaluate first, for the replay check and step length "
        "(default: the YAML's scoring.replay_cycles; 0 is faster but misses replays)",
    )
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")


def run_status(args: argparse.Namespace) -> int:
    """``connito status``: print each verdict; 0 when every hotkey was accepted, else 1."""
    with tempfile.TemporaryDirectory(prefix="connito-status-") as scratch:
        ctx = status_context(args, workdir=args.workdir or Path(scratch))
        statuses = explain_submissions(ctx, args.hotkey, args.cycle, history_cycles=args.history)
    for status in statuses:
        print(json.dumps(status.model_dump(), sort_keys=True) if args.json else format_status(status))
    return 0 if all(status.accepted for status in statuses) else 1


def status_context(args: argparse.Namespace, *, workdir: Path) -> NodeContext:
    """A read-only node context from ``connito status``'s flags (no wallet: nothing is signed).

    Raises:
        ConfigError, ChainError, StoreError: a flag, the config, the chain or the store is unusable.
    """
    import torch

    from connito.config import load_domain_config
    from connito.ml.selection_record import load_domain_selection
    from connito.node.context import load_node_data, open_store
    from connito.node.startup_checks import check_selection_matches_model

    config = load_domain_config(args.config)
    selection = load_domain_selection(args.selection, config)
    base_dir = args.model_path or _config_base_dir(config)
    check_selection_matches_model(selection, selection_path=args.selection, config=config, base_dir=base_dir)
    kind, _, path = str(args.hub).partition(":")
    return NodeContext(
        config=config,
        selection=selection,
        chain=_open_chain(args.chain, args.netuid if args.netuid is not None else config.netuid),
        store=open_store(kind, Path(path) if path else None),
        hotkey="status",
        base_dir=base_dir,
        workdir=workdir,
        data=load_node_data(config, args.data_cache or workdir / "cache"),
        device=torch.device("cpu"),
        hub_repo="status/none",
        keep_cycles=None,
    )


def _config_base_dir(config) -> Path:  # noqa: ANN001 - DomainConfig
    from connito.errors import ConfigError
    from connito.hub.models import snapshot_base_model

    if config.model.id is None:
        raise ConfigError("an inline or library model needs --model-path", field="--model-path")
    if Path(config.model.id).is_dir():
        return Path(config.model.id)
    return snapshot_base_model(config.model.id, config.model.revision)


def _open_chain(spec: str, netuid: int | None) -> Chain:
    from connito.errors import ConfigError

    if spec.startswith("local:"):
        from connito.chain.local import LocalChain

        return LocalChain.open(spec.removeprefix("local:"))
    if netuid is None:
        raise ConfigError("a subtensor chain needs --netuid (or netuid: in the YAML)", field="--netuid")
    from connito.chain.subtensor import SubtensorChain

    return SubtensorChain(netuid, network=spec)
