"""connito.data: offline generators, sources, the held-out split, tokenizer cache, packing, samples."""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import logging
import operator
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connito.config import DataConfig, DataSource, ModelConfig
from connito.data import (
    EOS_TOKEN,
    TokenizedDocuments,
    build_domain_data,
    check_vocab_fits,
    document_digest,
    generate_documents,
    generate_math_documents,
    generate_math_problem,
    is_heldout,
    load_documents,
    load_or_train_bpe_tokenizer,
    pack_blocks,
    seeded_order,
    shard_documents,
    split_documents,
    tokenize_documents,
    tokenizer_digest,
    train_bpe_tokenizer,
)
from connito.data.generators import CODE_MAX_CHARS, ENGLISH_MAX_CHARS
from connito.data.math_problems import MATH_TEMPLATES
from connito.errors import ConfigError

# sha256 of the first 50 math documents of seed 0, joined by NUL: pins the generator across
# machines and Python versions (math uses only string-seeded random.Random, stable everywhere).
MATH_GOLDEN_SHA256 = "10e76c4d5ee93b7249c8c58d8d482a686bc9840d2fdfdd2ac244fd9100bbe83e"
SEQ_LEN = 32

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: str) -> Fraction:
    """Exact arithmetic on + - * / and parentheses: an oracle independent of the generator."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


@pytest.fixture(scope="module")
def small_config() -> DataConfig:
    return DataConfig(
        train=[DataSource(kind="generated", name="math", max_documents=400)],
        general=[
            DataSource(kind="generated", name="english", max_documents=80),
            DataSource(kind="generated", name="code", max_documents=20),
        ],
        heldout_fraction=0.1,
        sequence_length=SEQ_LEN,
        tokenizer={"kind": "local_bpe", "vocab_size": 320},
    )


@pytest.fixture(scope="module")
def domain(small_config, tmp_path_factory):
    return build_domain_data(small_config, cache_dir=tmp_path_factory.mktemp("domain-cache"))


# ---- generators ---------------------------------------------------------------------------------


def test_math_annotations_and_final_answer_are_arithmetically_correct():
    """Every <<expr=value>> evaluates to value, and '#### N' is the last result and the answer."""
    for index in range(1500):
        problem = generate_math_problem(0, index)
        document = problem.to_document()
        annotations = re.findall(r"<<([^=<>]+)=(-?\d+)>>", document)
        assert annotations, document
        for expr, value in annotations:
            assert _evaluate(expr) == int(value), (problem.kind, expr, value)
        final = int(re.search(r"\n#### (-?\d+)$", document).group(1))
        assert final == problem.answer == int(annotations[-1][1]) >= 0, document


def test_math_generator_uses_many_templates():
    kinds = collections.Counter(generate_math_problem(3, i).kind for i in range(2000))
    assert len(kinds) == len(MATH_TEMPLATES) >= 15


def test_math_documents_match_golden_digest():
    """Same documents on every machine: the first 50 documents hash to a pinned value."""
    documents = generate_math_documents(50, seed=0)
    assert hashlib.sha256("\x00".join(documents).encode()).hexdigest() == MATH_GOLDEN_SHA256


def test_generators_are_deterministic_and_prefix_stable():
    for name in ("math", "english"):
        long = generate_documents(name, max_documents=60)
        assert generate_documents(name, max_documents=60) == long
        assert generate_documents(name, max_documents=25) == long[:25]
    assert generate_documents("code", max_documents=15) == generate_documents("code", max_documents=15)
    assert generate_documents("math", max_documents=20, seed=1) != generate_documents(
        "math", max_documents=20
    )


def test_english_and_code_documents_are_bounded_and_nonempty():
    english = generate_documents("english", max_documents=100)
    code = generate_documents("code", max_documents=40)
    assert len(english) == 100 and len(code) == 40
    assert all(0 < len(doc.strip()) and len(doc) <= ENGLISH_MAX_CHARS for doc in english)
    assert all(0 < len(doc.strip()) and len(doc) <= CODE_MAX_CHARS for doc in code)
    assert sum("def " in doc or "class " in doc for doc in code) > len(code) // 2


def test_unknown_generator_is_a_config_error():
    with pytest.raises(ConfigError, match="poetry"):
        generate_documents("poetry")


# ---- held-out split and shards ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=200), st.floats(0.01, 0.45), st.floats(0.01, 0.45))
def test_heldout_is_monotone_in_fraction(text, f1, f2):
    """A document held out at a fraction stays held out at any larger fraction (a threshold rule)."""
    low, high = sorted((f1, f2))
    assert not is_heldout(text, low) or is_heldout(text, high)


def test_heldout_share_is_close_to_fraction():
    documents = list(dict.fromkeys(generate_math_documents(4000)))
    share = sum(is_heldout(doc, 0.05) for doc in documents) / len(documents)
    assert 0.04 < share < 0.06


def test_split_and_shards_partition_documents_without_heldout():
    """Shards are disjoint, cover exactly the training documents, and no held-out doc is in any."""
    documents = generate_math_documents(600) + generate_math_documents(50)  # includes exact repeats
    split = split_documents(documents, heldout_fraction=0.1)
    heldout = {document_digest(doc) for doc in split.heldout}
    assert heldout and split.train
    for num_shards in (1, 3, 7):
        shards = [shard_documents(split.train, k, num_shards) for k in range(num_shards)]
        digests = [document_digest(doc) for shard in shards for doc in shard]
        assert len(digests) == len(set(digests)) == len(split.train)
        assert heldout.isdisjoint(digests)


def test_split_excludes_explicit_documents():
    documents = generate_math_documents(100)
    split = split_documents(documents, heldout_fraction=None, exclude=documents[:10])
    assert split.heldout == [] and split.train == list(dict.fromkeys(documents[10:]))


def test_bad_shard_is_a_config_error():
    with pytest.raises(ConfigError, match="shard_index"):
        shard_documents(["a"], 3, 3)


@given(st.integers(0, 300), st.integers())
def test_seeded_order_is_a_permutation(n, seed):
    assert sorted(seeded_order(n, "s", seed).tolist()) == list(range(n))


# ---- sources through datasets -------------------------------------------------------------------


def test_files_source_reads_jsonl_with_text_field_and_cap(tmp_path):
    rows = [{"body": f"document number {i}", "id": i} for i in range(5)] + [{"body": "   ", "id": 5}]
    (tmp_path / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = DataSource(kind="files", name=str(tmp_path / "*.jsonl"), text_field="body")
    assert load_documents(source) == [f"document number {i}" for i in range(5)]
    capped = source.model_copy(update={"max_documents": 2})
    assert load_documents(capped) == ["document number 0", "document number 1"]


def test_files_source_reads_text_files_by_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    documents = load_documents(DataSource(kind="files", name=str(tmp_path / "*.txt")))
    assert [doc.strip() for doc in documents] == ["first paragraph\nstill first", "second paragraph"]


def test_files_source_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        load_documents(DataSource(kind="files", name=str(tmp_path / "*.jsonl")))
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="text_field"):
        load_documents(DataSource(kind="files", name=str(tmp_path / "*.jsonl")))
    (tmp_path / "b.txt").write_text("y\n")
    with pytest.raises(ConfigError, match="one type"):
        load_documents(DataSource(kind="files", name=str(tmp_path / "*")))


# ---- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_cache_hit_returns_identical_tokenizer(tmp_path, caplog):
    texts = generate_math_documents(200) + generate_documents("english", max_documents=20)
    first = load_or_train_bpe_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="connito.data.tokenizer"):
        second = load_or_train_bpe_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    assert "cache hit" in caplog.text
    assert tokenizer_digest(first) == tokenizer_digest(second)
    sample = texts[7]
    assert first(sample)["input_ids"] == second(sample)["input_ids"]
    assert second.eos_token == EOS_TOKEN and second.pad_token_id is not None
    assert len(list((tmp_path / "tokenizer").iterdir())) == 1


def test_tokenizer_training_is_deterministic_and_lossless():
    texts = generate_math_documents(150) + generate_documents("code", max_documents=5)
    first = train_bpe_tokenizer(texts, vocab_size=300)
    assert tokenizer_digest(first) == tokenizer_digest(train_bpe_tokenizer(texts, vocab_size=300))
    assert len(first) == 300
    sample = texts[-1] + "\nünïcode ✓ 数学"
    assert first.decode(first(sample)["input_ids"]) == sample


def test_tokenizer_larger_than_model_vocab_is_rejected(tmp_path, small_config):
    tokenizer = train_bpe_tokenizer(generate_math_documents(50), vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size"):
        check_vocab_fits(tokenizer, 299)
    model = ModelConfig(inline={"model_type": "qwen3_moe", "vocab_size": 256})
    with pytest.raises(ConfigError, match="vocab_size"):
        build_domain_data(small_config, cache_dir=tmp_path, model=model)


# ---- tokenize and pack --------------------------------------------------------------------------


def test_pack_blocks_joins_with_eos_and_drops_tail():
    documents = TokenizedDocuments(tokens=np.array([5, 6, 7, 8, 9], np.uint16), offsets=np.array([0, 3, 5]))
    blocks = pack_blocks(documents, eos_token_id=0, sequence_length=2)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[5, 6], [7, 0], [8, 9]]  # stream 5 6 7 0 8 9 0: the last 0 is dropped


def test_tokenized_arrays_are_cached_by_content(tmp_path):
    texts = generate_math_documents(60)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    first = tokenize_documents(texts, tokenizer, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 1
    second = tokenize_documents(texts, tokenizer, cache_dir=tmp_path)
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.offsets, second.offsets)
    assert len(first) == 60 and first.num_tokens == len(first.tokens)
    tokenize_documents(texts[:30], tokenizer, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 2


# ---- the built domain ---------------------------------------------------------------------------


def test_domain_blocks_have_fixed_shape(domain):
    for blocks in (domain.heldout_blocks, domain.general_blocks, domain.train_blocks(0, 1)):
        assert blocks.dtype == torch.int64 and blocks.ndim == 2 and blocks.shape[1] == SEQ_LEN
        assert len(blocks) > 0 and int(blocks.max()) < len(domain.tokenizer)
    assert domain.stats.heldout_blocks == len(domain.heldout_blocks)
    expected = (domain.train.num_tokens + len(domain.train)) // SEQ_LEN  # every doc adds one EOS
    assert len(domain.train_blocks(0, 1)) == expected


def test_domain_shards_are_disjoint_and_cover_training_docs(domain):
    for num_shards in (2, 5):
        members = [domain.shard_members(k, num_shards) for k in range(num_shards)]
        joined = np.concatenate(members)
        assert len(joined) == len(np.unique(joined)) == len(domain.train)


def test_heldout_docs_never_in_miner_training_stream(small_config, domain):
    """Tokenize the held-out texts independently; none is a training document of any shard."""
    documents = load_documents(small_config.train[0])
    heldout = split_documents(documents, heldout_fraction=small_config.heldout_fraction).heldout
    assert heldout
    held = tokenize_documents(heldout, domain.tokenizer)
    held_docs = {tuple(held.tokens[held.offsets[i] : held.offsets[i + 1]].tolist()) for i in range(len(held))}
    for num_shards in (1, 4):
        for k in range(num_shards):
            shard = domain.train.select(domain.shard_members(k, num_shards))
            for i in range(len(shard)):
                assert tuple(shard.tokens[shard.offsets[i] : shard.offsets[i + 1]].tolist()) not in held_docs
    assert domain.stats.heldout_documents == len(heldout)


def test_heldout_sample_depends_only_on_seed(domain):
    first = domain.heldout_sample(seed=123, num_batches=3, batch_size=4)
    again = domain.heldout_sample(seed=123, num_batches=3, batch_size=4)
    other = domain.heldout_sample(seed=124, num_batches=3, batch_size=4)
    assert [tuple(b.shape) for b in first] == [(4, SEQ_LEN)] * 3
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    big = domain.heldout_sample(seed=2**200, num_batches=1, batch_size=2)  # a block-hash-sized seed
    assert torch.equal(big[0], domain.heldout_sample(seed=2**200, num_batches=1, batch_size=2)[0])


def test_heldout_sample_draws_without_replacement_within_a_pass(domain):
    count = len(domain.heldout_blocks)
    rows = torch.cat(domain.heldout_sample(seed=7, num_batches=count, batch_size=1))
    expected = collections.Counter(map(tuple, domain.heldout_blocks.tolist()))
    assert collections.Counter(map(tuple, rows.tolist())) == expected


def test_general_sample_is_seeded_and_from_general_blocks(domain):
    batches = domain.general_sample(seed=5, num_batches=2, batch_size=3)
    general = set(map(tuple, domain.general_blocks.tolist()))
    assert all(tuple(row) in general for batch in batches for row in batch.tolist())
    assert all(torch.equal(a, b) for a, b in zip(batches, domain.general_sample(5, 2, 3), strict=True))


def test_train_loader_visits_every_block_once_per_pass(domain):
    blocks = domain.train_blocks(1, 3)
    loader = domain.train_loader(1, 3, batch_size=4, seed=9)
    rows = torch.cat([next(loader) for _ in range(-(-len(blocks) // 4))])[: len(blocks)]
    assert collections.Counter(map(tuple, rows.tolist())) == collections.Counter(map(tuple, blocks.tolist()))
    again = domain.train_loader(1, 3, batch_size=4, seed=9)
    assert torch.equal(next(again), next(domain.train_loader(1, 3, 4, 9)))
    assert not torch.equal(next(domain.train_loader(1, 3, 4, 10)), next(domain.train_loader(1, 3, 4, 9)))


def test_mixture_loader_draws_only_weighted_parts(domain):
    assert [part.name for part in domain.mixture] == ["math", "english", "code"]
    loader = domain.mixture_loader(8, seed=0, weights={"code": 1.0, "math": 0.0})
    code = set(map(tuple, domain.mixture[2].blocks.tolist()))
    assert all(tuple(row) in code for _ in range(3) for row in next(loader).tolist())
    with pytest.raises(ConfigError, match="unknown"):
        domain.mixture_loader(8, seed=0, weights={"poetry": 1.0})


def test_explicit_validation_is_held_out_and_private_files_are_the_evaluation_pool(tmp_path, small_config):
    """data.validation text is the public held-out set and never trained on; a validator's private
    files become its evaluation pool, minus any document a miner could read in a public source."""
    math = generate_math_documents(400)
    fresh = [doc for doc in generate_math_documents(40, seed=7) if doc not in set(math)][:10]
    validation = tmp_path / "val.jsonl"
    validation.write_text("\n".join(json.dumps({"text": doc}) for doc in math[:30]) + "\n")
    private = tmp_path / "private.jsonl"
    private.write_text("\n".join(json.dumps({"text": doc}) for doc in [math[100], math[5], *fresh]) + "\n")
    config = small_config.model_copy(update={"validation": [DataSource(kind="files", name=str(validation))]})
    domain = build_domain_data(config, cache_dir=tmp_path, private_validation=[private])
    assert domain.stats.heldout_documents == 30
    assert domain.stats.train_documents == len(set(math)) - 30
    assert domain.private_blocks is not None
    public = build_domain_data(config, cache_dir=tmp_path)
    assert public.private_blocks is None
    fresh_only = tmp_path / "fresh.jsonl"
    fresh_only.write_text("\n".join(json.dumps({"text": doc}) for doc in fresh) + "\n")
    assert torch.equal(
        build_domain_data(config, cache_dir=tmp_path, private_validation=[fresh_only]).private_blocks,
        domain.private_blocks,
    )  # math[100] (public train) and math[5] (public held-out) were dropped from the private pool
    sample = domain.heldout_sample(seed=3, num_batches=2, batch_size=2)
    pool = set(map(tuple, domain.private_blocks.tolist()))
    assert all(tuple(row) in pool for batch in sample for row in batch.tolist())
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(json.dumps({"text": math[100]}) + "\n")
    with pytest.raises(ConfigError, match="no document outside the public sources"):
        build_domain_data(config, cache_dir=tmp_path, private_validation=[leaked])
    # a general source's documents are in the miners' training mixture: public too
    english = generate_documents("english", max_documents=80)[0]
    leaked.write_text(json.dumps({"text": english}) + "\n")
    with pytest.raises(ConfigError, match="no document outside the public sources"):
        build_domain_data(config, cache_dir=tmp_path, private_validation=[leaked])
