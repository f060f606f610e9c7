"""A domain's data, built once from its config: miner shards, held-out and general samples.

``build_domain_data`` loads every source, splits held-out text off by document hash, trains (or
loads) the tokenizer, tokenizes once with an on-disk cache and packs fixed-length blocks. The
record it returns keeps the invariant the protocol rests on: **held-out documents are never in any
miner's training stream** (neither the hash-held-out ones, nor explicit ``data.validation`` text,
nor validator-private files, nor exact copies of any of them).

Who uses what: miners call ``train_loader`` with their shard (``shard_index = uid % num_shards``
is the usual choice; shards are document-level, by ``split.shard_key``); validators call
``heldout_sample`` and ``general_sample`` with the cycle's evaluation seed; the subnet owner's
pretraining uses ``mixture_loader`` over the training parts of every source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from connito.config import DataConfig, DataSource, ModelConfig
from connito.data.assignment import assigned_mask, control_mask
from connito.data.packing import TokenizedDocuments, concat_tokenized, pack_blocks, tokenize_documents
from connito.data.sampling import cycle_batches, mixture_batches, sample_batches, seeded_rng
from connito.data.sources import load_documents
from connito.data.split import document_digest, shard_key, split_documents, unique_documents
from connito.data.tokenizer import check_vocab_fits, resolve_tokenizer
from connito.errors import ConfigError

__all__ = ["MixturePart", "DataStats", "DomainData", "build_domain_data"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class MixturePart:
    """The training blocks of one source and its pretraining mixture weight."""

    name: str
    weight: float
    blocks: torch.Tensor  # (N, T) int64


@dataclass(frozen=True, slots=True, kw_only=True)
class DataStats:
    """Sizes of a built domain, for logs and reports (tokens exclude the EOS packing adds)."""

    train_documents: int
    train_tokens: int
    heldout_documents: int
    heldout_tokens: int
    heldout_blocks: int
    general_train_documents: int
    general_train_tokens: int
    general_heldout_documents: int
    general_heldout_tokens: int
    general_blocks: int
    vocab_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainData:
    """Everything a node needs from a domain's text, tokenized and packed."""

    tokenizer: PreTrainedTokenizerFast
    sequence_length: int
    train: TokenizedDocuments  # every miner-visible domain document, all shards
    train_shard_keys: np.ndarray  # (len(train),) uint64: split.shard_key of each document
    heldout_blocks: torch.Tensor  # (N_h, T) int64: public domain held-out, never in a training stream
    general_blocks: torch.Tensor  # (N_g, T) int64: held-out part of the general reference
    mixture: tuple[MixturePart, ...]  # training parts of every train and general source
    stats: DataStats
    private_blocks: torch.Tensor | None = None  # (N_p, T): a validator's private evaluation documents

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def shard_members(self, shard_index: int, num_shards: int) -> np.ndarray:
        """Indices into ``train`` of the documents in shard ``shard_index`` of ``num_shards``.

        Shards are document-level, by ``split.shard_key``: disjoint, together exactly ``train``,
        and stable for a document whatever else the domain holds.

        Raises:
            ConfigError: a shard index outside ``[0, num_shards)``.
        """
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ConfigError(
                f"must be in [0, {num_shards}) with num_shards >= 1, got {shard_index}", field="shard_index"
            )
        return np.flatnonzero(self.train_shard_keys % np.uint64(num_shards) == np.uint64(shard_index))

    def train_blocks(self, shard_index: int, num_shards: int) -> torch.Tensor:
        """Packed blocks of the documents in one shard; (N, T) int64.

        Raises:
            ConfigError: a shard index outside ``[0, num_shards)``.
        """
        shard = self.train.select(self.shard_members(shard_index, num_shards))
        return pack_blocks(shard, eos_token_id=self.eos_token_id, sequence_length=self.sequence_length)

    def train_loader(
        self, shard_index: int, num_shards: int, batch_size: int, seed: int
    ) -> Iterator[torch.Tensor]:
        """Endless ``(batch_size, T)`` batches of one shard, reshuffled each pass from ``seed``.

        Raises:
            ConfigError: a bad shard, ``batch_size`` < 1, or a shard too small for one block.
        """
        blocks = self.train_blocks(shard_index, num_shards)
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", field="batch_size")
        if len(blocks) == 0:
            raise ConfigError(
                f"shard {shard_index} of {num_shards} has no full block of {self.sequence_length}"
            )
        rng = seeded_rng("train", seed, shard_index, num_shards)
        return cycle_batches(blocks, batch_size=batch_size, rng=rng)

    def assigned_blocks(self, *, domain: str, cycle: int, hotkey: str, fraction: float) -> torch.Tensor:
        """Packed blocks of the documents ``hotkey`` must train on in ``cycle``; (N, T) int64."""
        mask = assigned_mask(
            self.train_shard_keys, domain=domain, cycle=cycle, hotkey=hotkey, fraction=fraction
        )
        return self._pack(np.flatnonzero(mask))

    def control_blocks(self, *, domain: str, cycle: int, fraction: float) -> torch.Tensor:
        """Packed blocks of ``cycle``'s control documents, assigned to no miner; (N, T) int64."""
        mask = control_mask(self.train_shard_keys, domain=domain, cycle=cycle, fraction=fraction)
        return self._pack(np.flatnonzero(mask))

    def assigned_loader(
        self, *, domain: str, cycle: int, hotkey: str, fraction: float, batch_size: int, seed: int
    ) -> Iterator[torch.Tensor]:
        """Endless ``(batch_size, T)`` batches of the miner's assigned blocks, reshuffled each pass.

        Raises:
            ConfigError: ``batch_size`` < 1, or an assignment too small for one block.
        """
        blocks = self.assigned_blocks(domain=domain, cycle=cycle, hotkey=hotkey, fraction=fraction)
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", field="batch_size")
        if len(blocks) == 0:
            raise ConfigError(
                f"the cycle {cycle} assignment of hotkey {hotkey} has no full block of {self.sequence_length}",
                field="training.assignment_fraction",
            )
        return cycle_batches(blocks, batch_size=batch_size, rng=seeded_rng("assigned", seed, cycle))

    def _pack(self, members: np.ndarray) -> torch.Tensor:
        return pack_blocks(
            self.train.select(members), eos_token_id=self.eos_token_id, sequence_length=self.sequence_length
        )

    def heldout_sample(self, seed: int, num_batches: int, batch_size: int) -> list[torch.Tensor]:
        """The validators' seeded sample of the evaluation pool: same seed, same batches, same pool.

        The pool is this validator's private evaluation documents when it has them (no miner can
        have trained on those), else the public held-out documents.

        Raises:
            ConfigError: no held-out blocks, or a count < 1.
        """
        pool = self.private_blocks if self.private_blocks is not None else self.heldout_blocks
        return sample_batches(pool, seed=seed, num_batches=num_batches, batch_size=batch_size, salt="heldout")

    def general_sample(self, seed: int, num_batches: int, batch_size: int) -> list[torch.Tensor]:
        """The seeded sample of general held-out blocks for the forgetting guard.

        Raises:
            ConfigError: no general blocks (no general source), or a count < 1.
        """
        return sample_batches(
            self.general_blocks, seed=seed, num_batches=num_batches, batch_size=batch_size, salt="general"
        )

    def mixture_loader(
        self, batch_size: int, seed: int, *, weights: Mapping[str, float] | None = None
    ) -> Iterator[torch.Tensor]:
        """Endless pretraining batches mixing every source's training blocks by weight.

        ``weights`` (by part name, e.g. ``{"english": 0.4, "code": 0.4, "math": 0.2}``) overrides
        the sources' configured weights; a part given weight 0 or left out of it is not drawn.

        Raises:
            ConfigError: an unknown part name, no positive weight, or an empty weighted part.
        """
        chosen = weights if weights is not None else {part.name: part.weight for part in self.mixture}
        parts = {part.name: part.blocks for part in self.mixture}
        unknown = sorted(set(chosen) - set(parts))
        if unknown:
            raise ConfigError(f"unknown mixture parts {unknown}, known {sorted(parts)}", field="weights")
        active = {name: w for name, w in chosen.items() if w > 0}
        empty = sorted(name for name in active if len(parts[name]) == 0)
        if not active or empty:
            raise ConfigError(
                f"mixture needs positive weights on non-empty parts, empty={empty}", field="weights"
            )
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", field="batch_size")
        blocks = {name: parts[name] for name in active}
        return mixture_batches(blocks, active, batch_size=batch_size, rng=seeded_rng("mixture", seed))


def build_domain_data(
    data: DataConfig,
    *,
    cache_dir: str | Path,
    model: ModelConfig | None = None,
    private_validation: Sequence[str | Path] = (),
) -> DomainData:
    """Load, split, tokenize and pack a domain's text.

    Held-out domain text is ``data.validation`` when given (train documents equal to one are
    dropped), else the ``heldout_fraction`` of train documents picked by hash. ``private_validation``
    files (json/jsonl/txt/parquet with a ``text`` field, a validator's own) become the evaluation
    pool (``DomainData.heldout_sample``); a private document that also appears in a public source
    is dropped from it, since a miner could have trained on it. General sources are split by the same hash rule. The tokenizer is
    trained on public text only (train and general training parts), so every node derives the same
    one; with an inline model config its ids must fit ``vocab_size``.

    Raises:
        ConfigError: a source cannot be loaded, the tokenizer does not fit the model, or a split is
            left empty.
    """
    _check_inline_vocab(data, model)
    texts = _load_texts(data, private_validation=private_validation)
    tokenizer = resolve_tokenizer(data.tokenizer, corpus=texts.corpus, cache_dir=cache_dir, model=model)
    if model is not None and model.inline is not None and "vocab_size" in model.inline:
        check_vocab_fits(tokenizer, int(model.inline["vocab_size"]))
    domain = _assemble(data, texts, tokenizer, cache_dir=cache_dir)
    stats = domain.stats
    logger.info(
        "data built train_documents=%d train_tokens=%d heldout_documents=%d heldout_blocks=%d "
        "general_heldout_documents=%d general_blocks=%d vocab_size=%d",
        stats.train_documents,
        stats.train_tokens,
        stats.heldout_documents,
        stats.heldout_blocks,
        stats.general_heldout_documents,
        stats.general_blocks,
        stats.vocab_size,
    )
    return domain


@dataclass(frozen=True, slots=True, kw_only=True)
class _Texts:
    """A domain's documents after the held-out split, before tokenization."""

    train: list[list[str]]  # per train source, what miners may see
    heldout: list[str]  # public domain held-out: hash split or data.validation
    private: list[str]  # a validator's private evaluation documents (never public, never trained on)
    general_train: list[list[str]]  # per general source
    general_heldout: list[str]
    corpus: list[str]  # public text the tokenizer trains on (no private files)


def _load_texts(data: DataConfig, *, private_validation: Sequence[str | Path]) -> _Texts:
    explicit = [doc for source in data.validation for doc in load_documents(source)]
    private = [doc for path in private_validation for doc in load_documents(_files(path))]
    fraction = None if data.validation else data.heldout_fraction
    train_splits = [
        split_documents(load_documents(source), heldout_fraction=fraction, exclude=explicit)
        for source in data.train
    ]
    general_splits = [
        split_documents(load_documents(source), heldout_fraction=data.heldout_fraction)
        for source in data.general
    ]
    # a private document is evaluation data only if no miner can read it: not in any public source
    readable = train_splits + general_splits  # miners train on general sources' training parts too
    public = {document_digest(doc) for split in readable for doc in split.train + split.heldout}
    public |= {document_digest(doc) for doc in explicit}
    private = [doc for doc in unique_documents(private) if document_digest(doc) not in public]
    train = [split.train for split in train_splits]
    hashed_out = [doc for split in train_splits for doc in split.heldout]
    heldout = unique_documents(explicit if data.validation else hashed_out)
    if private_validation and not private:
        raise ConfigError(
            f"private evaluation files {[str(p) for p in private_validation]} hold no document outside "
            "the public sources",
            field="eval.private_data",
        )
    if not any(train) or not heldout:
        raise ConfigError(
            f"split left train_documents={sum(map(len, train))} heldout_documents={len(heldout)}",
            field="data",
        )
    return _Texts(
        train=train,
        heldout=heldout,
        private=private,
        general_train=[split.train for split in general_splits],
        general_heldout=unique_documents([doc for split in general_splits for doc in split.heldout]),
        corpus=[doc for split in train_splits + general_splits for doc in split.train],
    )


def _assemble(
    data: DataConfig, texts: _Texts, tokenizer: PreTrainedTokenizerFast, *, cache_dir: str | Path
) -> DomainData:
    def tokenize(documents: Sequence[str]) -> TokenizedDocuments:
        return tokenize_documents(documents, tokenizer, cache_dir=cache_dir)

    def pack(documents: TokenizedDocuments) -> torch.Tensor:
        return pack_blocks(
            documents, eos_token_id=tokenizer.eos_token_id, sequence_length=data.sequence_length
        )

    train_parts = [tokenize(documents) for documents in texts.train]
    general_parts = [tokenize(documents) for documents in texts.general_train]
    heldout, general_heldout = tokenize(texts.heldout), tokenize(texts.general_heldout)
    train = concat_tokenized(train_parts)
    sources = [*data.train, *data.general]
    mixture = tuple(
        MixturePart(name=name, weight=source.weight, blocks=pack(part))
        for name, source, part in zip(_part_names(sources), sources, train_parts + general_parts, strict=True)
    )
    heldout_blocks, general_blocks = pack(heldout), pack(general_heldout)
    private_blocks = pack(tokenize(texts.private)) if texts.private else None
    shard_keys = [shard_key(doc) for documents in texts.train for doc in documents]
    return DomainData(
        tokenizer=tokenizer,
        sequence_length=data.sequence_length,
        train=train,
        train_shard_keys=np.asarray(shard_keys, dtype=np.uint64),
        heldout_blocks=heldout_blocks,
        general_blocks=general_blocks,
        private_blocks=private_blocks,
        mixture=mixture,
        stats=DataStats(
            train_documents=len(train),
            train_tokens=train.num_tokens,
            heldout_documents=len(heldout),
            heldout_tokens=heldout.num_tokens,
            heldout_blocks=len(heldout_blocks),
            general_train_documents=sum(map(len, general_parts)),
            general_train_tokens=sum(part.num_tokens for part in general_parts),
            general_heldout_documents=len(general_heldout),
            general_heldout_tokens=general_heldout.num_tokens,
            general_blocks=len(general_blocks),
            vocab_size=len(tokenizer),
        ),
    )


def _files(path: str | Path) -> DataSource:
    return DataSource(kind="files", name=str(path))


def _check_inline_vocab(data: DataConfig, model: ModelConfig | None) -> None:
    """Fail before training a tokenizer the model could not embed."""
    if model is None or model.inline is None or "vocab_size" not in model.inline:
        return
    if data.tokenizer.kind == "local_bpe" and data.tokenizer.vocab_size > int(model.inline["vocab_size"]):
        raise ConfigError(
            f"tokenizer.vocab_size {data.tokenizer.vocab_size} exceeds model.inline.vocab_size "
            f"{model.inline['vocab_size']}",
            field="data.tokenizer.vocab_size",
        )


def _part_names(sources: Sequence[DataSource]) -> list[str]:
    """One name per source: its ``name``, with ``#k`` added to repeats."""
    names: list[str] = []
    for source in sources:
        name = source.name
        count = sum(1 for existing in names if existing.split("#")[0] == name)
        names.append(f"{name}#{count}" if count else name)
    return names
