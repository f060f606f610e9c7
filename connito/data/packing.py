"""Tokenize documents once (cached on disk by content hash) and pack them into fixed-length blocks.

Packing follows GPT pretraining: each document is followed by EOS, the stream is cut into blocks
of ``sequence_length`` tokens and the incomplete tail is dropped. Blocks may start mid-document;
EOS tells the model where one document ends. The order of blocks is the order of documents, so
the same documents always give the same tensor.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from connito.data.tokenizer import corpus_digest, tokenizer_digest
from connito.fsutil import atomic_write, keep_newest, touch

__all__ = ["TokenizedDocuments", "tokenize_documents", "concat_tokenized", "pack_blocks"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the on-disk layout changes
# Token files kept (least recently used go first): a build writes one per source and split, so
# this holds several builds while data that changed long ago stops taking disk.
TOKEN_CACHE_ENTRIES = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenizedDocuments:
    """Token ids of many documents, flat: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # (total_tokens,) uint16 or uint32, without EOS
    offsets: np.ndarray  # (num_documents + 1,) int64, offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents, not counting the EOS packing adds."""
        return int(self.offsets[-1])

    def select(self, indices: np.ndarray) -> TokenizedDocuments:
        """The documents at ``indices``, in that order."""
        lengths = np.diff(self.offsets)[indices]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        parts = [self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        tokens = np.concatenate(parts) if parts else self.tokens[:0]
        return TokenizedDocuments(tokens=tokens, offsets=offsets)


def tokenize_documents(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    *,
    cache_dir: str | Path | None = None,
) -> TokenizedDocuments:
    """Token ids of ``texts`` (no special tokens), loaded from ``cache_dir/tokens/`` when cached.

    The cache key hashes the tokenizer's full state and the ordered document digests; files are
    written atomically, so a crash mid-write leaves no half file that a later run would trust.
    The folder keeps the ``TOKEN_CACHE_ENTRIES`` most recently used files.
    """
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{_CACHE_FORMAT}:{tokenizer_digest(tokenizer)}:{corpus_digest(texts)}".encode()
        ).hexdigest()[:32]
        path = Path(cache_dir) / "tokens" / f"{key}.npz"
        if path.is_file():
            touch(path)
            with np.load(path, allow_pickle=False) as stored:
                return TokenizedDocuments(tokens=stored["tokens"], offsets=stored["offsets"])
    tokenized = _encode(texts, tokenizer)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, tokens=tokenized.tokens, offsets=tokenized.offsets)
        atomic_write(path, buffer.getvalue())
        keep_newest(path.parent, keep=TOKEN_CACHE_ENTRIES, pattern="*.npz")
        logger.debug("tokens cached path=%s documents=%d tokens=%d", path, len(texts), tokenized.num_tokens)
    return tokenized


def _encode(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> TokenizedDocuments:
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    # the Rust backend directly: batched (parallel where TOKENIZERS_PARALLELISM allows), no offsets
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((i for e in encodings for i in e.ids), dtype=dtype, count=int(offsets[-1]))
    return TokenizedDocuments(tokens=tokens, offsets=offsets)


def concat_tokenized(parts: Sequence[TokenizedDocuments]) -> TokenizedDocuments:
    """Documents of all ``parts``, in order, as one ``TokenizedDocuments``."""
    if not parts:
        return TokenizedDocuments(tokens=np.zeros(0, dtype=np.uint16), offsets=np.zeros(1, dtype=np.int64))
    tokens = np.concatenate([p.tokens for p in parts])
    shifts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + shift for p, shift in zip(parts, shifts, strict=True)])
    return TokenizedDocuments(tokens=tokens, offsets=offsets.astype(np.int64))


def pack_blocks(documents: TokenizedDocuments, *, eos_token_id: int, sequence_length: int) -> torch.Tensor:
    """Join documents with EOS after each and cut into blocks; the incomplete tail is dropped.

    Returns ``(num_blocks, sequence_length)`` int64, possibly with zero blocks.
    """
    stream = np.insert(documents.tokens.astype(np.int64), documents.offsets[1:], eos_token_id)
    num_blocks = len(stream) // sequence_length
    blocks = stream[: num_blocks * sequence_length].reshape(num_blocks, sequence_length)  # (N, T)
    return torch.from_numpy(np.ascontiguousarray(blocks))
