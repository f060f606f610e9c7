"""Domain text for connito: offline generators, sources through ``datasets``, the held-out split,
tokenizers, packing and the seeded loaders miners and validators share.

The rule the package keeps: a held-out document (by hash, by ``data.validation`` or from a
validator's private files) never reaches a miner's training stream.
"""

from connito.data.generators import GENERATOR_NAMES, generate_documents
from connito.data.math_problems import MathProblem, generate_math_documents, generate_math_problem
from connito.data.packing import TokenizedDocuments, concat_tokenized, pack_blocks, tokenize_documents
from connito.data.pipeline import DataStats, DomainData, MixturePart, build_domain_data
from connito.data.sampling import seeded_order, seeded_rng
from connito.data.sources import load_documents, load_source
from connito.data.split import (
    DocumentSplit,
    document_digest,
    is_heldout,
    shard_documents,
    shard_key,
    shard_of,
    split_documents,
    unique_documents,
)
from connito.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    check_vocab_fits,
    load_or_train_bpe_tokenizer,
    load_pretrained_tokenizer,
    resolve_tokenizer,
    tokenizer_digest,
    train_bpe_tokenizer,
)

__all__ = [
    "GENERATOR_NAMES",
    "generate_documents",
    "MathProblem",
    "generate_math_documents",
    "generate_math_problem",
    "TokenizedDocuments",
    "concat_tokenized",
    "pack_blocks",
    "tokenize_documents",
    "DataStats",
    "DomainData",
    "MixturePart",
    "build_domain_data",
    "seeded_order",
    "seeded_rng",
    "load_documents",
    "load_source",
    "DocumentSplit",
    "document_digest",
    "is_heldout",
    "shard_documents",
    "shard_key",
    "shard_of",
    "split_documents",
    "unique_documents",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "check_vocab_fits",
    "load_or_train_bpe_tokenizer",
    "load_pretrained_tokenizer",
    "resolve_tokenizer",
    "tokenizer_digest",
    "train_bpe_tokenizer",
]
