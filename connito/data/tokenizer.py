"""Tokenizers: a pretrained one by id, or a byte-level BPE that connito trains and caches.

A trained tokenizer is a pure function of its corpus and settings (``tokenizers``' BPE trainer
breaks ties by token id, so two processes produce the same merges), and its cache folder is keyed
by a hash of both: a re-run loads instead of retraining, and a changed corpus can never load a
stale vocabulary. Every node of a domain must tokenize identically, so the corpus passed here must
be public text only (never validator-private files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from connito.config import ModelConfig, TokenizerConfig
from connito.data.split import document_digest
from connito.errors import ConfigError
from connito.fsutil import atomic_write, keep_newest, touch

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "train_bpe_tokenizer",
    "load_or_train_bpe_tokenizer",
    "load_pretrained_tokenizer",
    "resolve_tokenizer",
    "tokenizer_digest",
    "corpus_digest",
    "check_vocab_fits",
]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_CACHE_ENTRIES = 4  # trained tokenizers kept (least recently used go first)
_CACHE_FORMAT = 1  # bump when the trained tokenizer's recipe changes


def train_bpe_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (EOS and PAD take ids 0 and 1; no text is ever <unk>)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def corpus_digest(texts: Sequence[str]) -> str:
    """sha256 over the ordered document digests: the identity of a corpus (hex)."""
    hasher = hashlib.sha256()
    for text in texts:
        hasher.update(document_digest(text))
    return hasher.hexdigest()


def load_or_train_bpe_tokenizer(
    texts: Sequence[str], *, vocab_size: int, cache_dir: str | Path
) -> PreTrainedTokenizerFast:
    """The BPE for ``texts``: loaded from ``cache_dir/tokenizer/`` when trained before, else trained and cached.

    The key hashes the recipe version, the vocabulary size, the special tokens, the ``tokenizers``
    version and the corpus digest, so only an identical request hits the cache.
    """
    recipe = {
        "format": _CACHE_FORMAT,
        "vocab_size": vocab_size,
        "special_tokens": [EOS_TOKEN, PAD_TOKEN],
        "tokenizers": tokenizers.__version__,
        "corpus": corpus_digest(texts),
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    path = Path(cache_dir) / "tokenizer" / f"bpe-{key}" / "tokenizer.json"
    if path.is_file():
        touch(path.parent)
        logger.info("tokenizer cache hit key=%s vocab_size=%d", key, vocab_size)
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    atomic_write(path, tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    keep_newest(path.parent.parent, keep=TOKENIZER_CACHE_ENTRIES, pattern="bpe-*")
    logger.info("tokenizer trained key=%s vocab_size=%d documents=%d", key, len(tokenizer), len(texts))
    return tokenizer


def load_pretrained_tokenizer(name: str, *, revision: str = "main") -> PreTrainedTokenizerFast:
    """A Hub or local tokenizer (never remote code); PAD falls back to EOS when it has none.

    Raises:
        ConfigError: the tokenizer cannot be loaded or has no EOS token (packing needs one).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load tokenizer: {type(exc).__name__}", path=name, field="tokenizer"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer has no eos token, needed to separate packed documents", path=name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_tokenizer(
    config: TokenizerConfig,
    *,
    corpus: Sequence[str],
    cache_dir: str | Path,
    model: ModelConfig | None = None,
) -> PreTrainedTokenizerFast:
    """The tokenizer a domain config asks for: ``local_bpe`` trained on ``corpus``, or ``pretrained``.

    ``pretrained`` uses ``config.id`` or else the model's Hub id and revision.

    Raises:
        ConfigError: ``pretrained`` with neither a tokenizer id nor a model id, or a load failure.
    """
    if config.kind == "local_bpe":
        return load_or_train_bpe_tokenizer(corpus, vocab_size=config.vocab_size, cache_dir=cache_dir)
    if config.id is not None:
        return load_pretrained_tokenizer(config.id)
    if model is None or model.id is None:
        raise ConfigError(
            "pretrained tokenizer needs tokenizer.id when the model has no id", field="tokenizer.id"
        )
    return load_pretrained_tokenizer(model.id, revision=model.revision)


def tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full serialized state (vocabulary, merges, normalizer...), hex."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def check_vocab_fits(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """Every id the tokenizer can emit must index the model's embedding.

    Raises:
        ConfigError: the tokenizer has more ids than the model's ``vocab_size``.
    """
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} ids, more than the model's vocab_size {vocab_size}",
            field="model.inline.vocab_size",
        )
