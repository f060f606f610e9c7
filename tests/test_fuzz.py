"""Fuzzing the four parsers of untrusted input: only connito's own validation errors ever escape.

Each target gets structure-aware mutations of a valid input (the inputs a real attacker would
start from) as well as raw noise; the property is the same everywhere: the parser returns a
valid record or raises its one documented error class with a one-line message, never
``KeyError``, ``RecursionError``, a pydantic ``ValidationError`` or anything else.

- checkpoint loader -> ``InvalidSubmission`` with a documented ``reason``
- manifest parser -> ``InvalidSubmission("bad_manifest")``
- commitment decoder -> ``CommitmentDecodeError``
- domain config loader -> ``ConfigError``

Seed corpora that complement the fuzzers in ``test_checkpoint.py`` (random experts bytes,
structured headers, random manifest bytes) and ``test_protocol.py`` (random commitment bytes).
"""

from __future__ import annotations

import copy
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import yaml
from conftest import make_selection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connito.config import DomainConfig, config_digest, load_domain_config, parse_domain_config
from connito.errors import CommitmentDecodeError, ConfigError, InvalidSubmission
from connito.ml.moe import expert_key
from connito.protocol.checkpoint import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    ExpertSpec,
    Manifest,
    selected_keys,
    tensors_digest,
    write_checkpoint,
)
from connito.protocol.commitments import (
    CommitPayload,
    GlobalPayload,
    RevealPayload,
    decode_commitment,
    encode_commitment,
)
from connito.protocol.strict_loader import load_checkpoint

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Every reason the strict loader documents (connito/protocol/strict_loader.py module docstring).
LOADER_REASONS = {
    "missing_file",
    "extra_file",
    "too_large",
    "bad_manifest",
    "wrong_selection",
    "not_safetensors",
    "extra_key",
    "missing_key",
    "shape",
    "dtype",
    "digest_mismatch",
    "non_finite",
}
TINY_MATH = Path(__file__).resolve().parents[1] / "configs" / "domains" / "tiny-math.yaml"

HIDDEN, INTER = 8, 4
MAX_BYTES = 1 << 16
SELECTION = make_selection({0: (1,), 1: (0, 2)}, num_experts=4, domain="fuzz", probe_tokens=100)
KEYS = selected_keys(SELECTION)
SHAPES = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
SPECS = {key: ExpertSpec(SHAPES[key.split(".")[-2]], torch.float32) for key in KEYS}
HOSTILE_KEYS = [
    "model.layers.0.mlp.gate.weight",  # router
    "model.layers.0.mlp.shared_expert.up_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.embed_tokens.weight",
    expert_key(0, 3, "up_proj"),  # unselected
    "model.layers.0.mlp.experts.01.up_proj.weight",  # an alias of a selected key
    "model.layers.0.mlp.experts.gate_up_proj",  # the fused tensor
]
_counter = itertools.count()


def _fresh(tmp_path: Path) -> Path:
    """A new folder per hypothesis example (the tmp_path fixture is shared by all examples)."""
    return tmp_path / f"example-{next(_counter)}"


def _manifest_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        kind="submission",
        domain=SELECTION.domain,
        model_id=SELECTION.model_id,
        model_revision=SELECTION.model_revision,
        selection_digest=SELECTION.digest,
        cycle=3,
        global_revision="0123abcd",
        hotkey="5Fminer",
        created_block=12,
    )
    fields.update(overrides)
    return fields


def _valid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(spec.shape, generator=generator) for key, spec in SPECS.items()}


def _load(folder: Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    return load_checkpoint(
        folder, selection=SELECTION, expected=SPECS, max_bytes=MAX_BYTES, max_manifest_bytes=4096
    )


def _assert_loads_cleanly_or_rejects(folder: Path) -> None:
    """The loader's contract: a fully valid checkpoint, or InvalidSubmission with a known reason."""
    try:
        manifest, state = _load(folder)
    except InvalidSubmission as err:
        assert err.reason in LOADER_REASONS, err.reason
        assert "\n" not in str(err)
        return
    assert sorted(state) == KEYS
    for key, tensor in state.items():
        assert (tuple(tensor.shape), tensor.dtype) == SPECS[key]
        assert bool(torch.isfinite(tensor).all())
    assert tensors_digest(state) == manifest.tensors_sha256


# --- checkpoint loader ------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8]
_tensor_plans = st.fixed_dictionaries(
    {
        "shape": st.sampled_from(["right", "transposed", "flat", "empty", "bigger"]),
        "dtype": st.sampled_from(_DTYPES),
        "poison": st.sampled_from([None, float("nan"), float("inf"), float("-inf"), 1e30]),
    }
)


def _planned_tensor(key: str, plan: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    rows, cols = SHAPES.get(key.split(".")[-2], (INTER, HIDDEN))
    shape = {
        "right": (rows, cols),
        "transposed": (cols, rows),
        "flat": (rows * cols,),
        "empty": (0, cols),
        "bigger": (rows + 1, cols),
    }[plan["shape"]]
    tensor = torch.randn(shape, generator=generator)
    if plan["poison"] is not None and tensor.numel():
        tensor.view(-1)[0] = plan["poison"]
    return tensor.to(plan["dtype"])


@FUZZ
@given(
    plans=st.dictionaries(st.sampled_from(KEYS + HOSTILE_KEYS), _tensor_plans, max_size=len(KEYS) + 2),
    keep_all_selected=st.booleans(),
    manifest_matches=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_safetensors_payload_loads_cleanly_or_is_rejected(
    tmp_path, plans, keep_all_selected, manifest_matches, seed
):
    """Well-formed safetensors with any keys, shapes, dtypes and values: valid or InvalidSubmission."""
    generator = torch.Generator().manual_seed(seed)
    if keep_all_selected:
        plans = {**{key: {"shape": "right", "dtype": torch.float32, "poison": None} for key in KEYS}, **plans}
    tensors = {key: _planned_tensor(key, plan, generator) for key, plan in sorted(plans.items())}
    folder = _fresh(tmp_path)
    folder.mkdir()
    safetensors.torch.save_file(tensors, str(folder / EXPERTS_FILE))
    digest = tensors_digest(tensors) if manifest_matches else "ab" * 32
    (folder / MANIFEST_FILE).write_bytes(Manifest(**_manifest_fields(tensors_sha256=digest)).to_json())
    _assert_loads_cleanly_or_rejects(folder)


_mutations = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "truncate", "insert"]), st.integers(0, 2**20), st.binary(max_size=8)
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    for op, where, chunk in mutations:
        position = where % (len(data) + 1)
        if op == "overwrite":
            data = data[:position] + chunk + data[position + len(chunk) :]
        elif op == "truncate":
            data = data[:position]
        else:
            data = data[:position] + chunk + data[position:]
    return data


@FUZZ
@given(target=st.sampled_from([EXPERTS_FILE, MANIFEST_FILE]), mutations=_mutations)
def test_byte_mutations_of_a_valid_checkpoint_never_escape_the_loader(tmp_path, target, mutations):
    """Flipped, cut or inserted bytes in either file of a real checkpoint: valid or InvalidSubmission."""
    folder = _fresh(tmp_path)
    write_checkpoint(folder, _valid_state(), **_manifest_fields())
    path = folder / target
    path.write_bytes(_mutate(path.read_bytes(), mutations))
    _assert_loads_cleanly_or_rejects(folder)


@FUZZ
@given(
    entries=st.lists(
        st.tuples(
            st.text(alphabet="abc.-_ \n\\é", min_size=1, max_size=12).filter(lambda n: n not in (".", "..")),
            st.sampled_from(["file", "dir"]),
        ),
        max_size=4,
    ),
    drop=st.sampled_from([None, EXPERTS_FILE, MANIFEST_FILE]),
)
def test_folder_with_any_extra_or_missing_entries_is_valid_or_rejected(tmp_path, entries, drop):
    """Extra files or folders of any name, or a missing one: only the two files are ever accepted."""
    folder = _fresh(tmp_path)
    write_checkpoint(folder, _valid_state(), **_manifest_fields())
    if drop is not None:
        (folder / drop).unlink()
    added = set()
    for name, kind in entries:
        if (folder / name).exists():
            continue
        (folder / name).mkdir() if kind == "dir" else (folder / name).write_bytes(b"x")
        added.add(name)
    try:
        _load(folder)
    except InvalidSubmission as err:
        assert err.reason in {"extra_file", "missing_file"}, err.reason
        return
    assert drop is None and added <= {".cache"}  # hf_hub_download's bookkeeping is the only allowance


# --- manifest parser --------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "ab" * 32, "\x00", "a\nb", "é" * 200, "x" * 300]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_MANIFEST_FIELDS = list(Manifest.model_fields)


def _valid_manifest_body() -> dict[str, Any]:
    return json.loads(Manifest(**_manifest_fields(tensors_sha256="cd" * 32)).to_json())


@st.composite
def _mutated_manifest_bytes(draw: st.DrawFn) -> bytes:
    body = _valid_manifest_body()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "delete", "add", "duplicate", "wrap"]))
        field = draw(st.sampled_from(_MANIFEST_FIELDS))
        if op == "replace":
            body[field] = draw(_json_values)
        elif op == "delete":
            body.pop(field, None)
        elif op == "add":
            body[draw(st.text(max_size=10))] = draw(_json_values)
        elif op == "wrap":
            body = {"manifest": body} if isinstance(body, dict) else body
    raw = json.dumps(body).encode()
    if op == "duplicate" and raw.endswith(b"}") and len(raw) > 2:
        raw = raw[:-1] + b', "cycle": 4}'  # two parsers could keep different values
    return raw


@FUZZ
@given(raw=_mutated_manifest_bytes() | st.binary(max_size=300))
def test_manifest_mutations_parse_or_raise_bad_manifest(raw):
    """A mutated manifest is either a valid Manifest that round-trips, or bad_manifest on one line."""
    try:
        manifest = Manifest.from_json(raw)
    except InvalidSubmission as err:
        assert err.reason == "bad_manifest" and "\n" not in str(err)
        return
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 50_000 + b"]" * 50_000, id="deep_array"),
        pytest.param(b'{"a":' * 20_000 + b"1" + b"}" * 20_000, id="deep_object"),
        pytest.param(json.dumps(_valid_manifest_body()).encode()[:-1] + b', "cycle": 4}', id="duplicate_key"),
        pytest.param(
            json.dumps(_valid_manifest_body()).replace('"cycle": 3', '"cycle": 1' + "0" * 5000).encode(),
            id="huge_int",
        ),
        pytest.param(
            json.dumps(_valid_manifest_body()).replace('"cycle": 3', '"cycle": NaN').encode(), id="nan"
        ),
        pytest.param(json.dumps(_valid_manifest_body()).encode("utf-16"), id="utf16"),
    ],
)
def test_hostile_manifest_text_is_bad_manifest(raw):
    """Parser-splitting inputs: nesting past any stack, duplicate keys, 5000-digit ints, NaN, UTF-16."""
    with pytest.raises(InvalidSubmission) as info:
        Manifest.from_json(raw)
    assert info.value.reason == "bad_manifest" and "\n" not in str(info.value)


# --- commitment decoder -----------------------------------------------------------------------

_VALID_COMMITMENTS = [
    encode_commitment(CommitPayload(cycle=9, digest=bytes(range(32)))),
    encode_commitment(
        RevealPayload(
            cycle=9, store_kind="hf", repo="miner-1/experts", revision="ab" * 20, manifest_digest=b"m" * 16
        )
    ),
    encode_commitment(
        RevealPayload(
            cycle=9, store_kind="local", repo="nodes/m0", revision="cd" * 32, manifest_digest=b"d" * 16
        )
    ),
    encode_commitment(
        GlobalPayload(
            cycle=9, store_kind="local", repo="nodes/v0", revision="ef" * 32, record_digest=b"r" * 16
        )
    ),
]


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(_VALID_COMMITMENTS), mutations=_mutations)
def test_mutated_commitments_decode_exactly_or_raise_decode_error(base, mutations):
    """Bit flips, cuts and insertions into real commitments: a payload that re-encodes to the same
    bytes, or CommitmentDecodeError; never another exception."""
    data = _mutate(base, mutations)
    try:
        payload = decode_commitment(data)
    except CommitmentDecodeError as err:
        assert "\n" not in str(err)
        return
    assert encode_commitment(payload) == data


@settings(max_examples=100, deadline=None)
@given(value=_json_values | st.binary().map(bytearray) | st.builds(object))
def test_non_bytes_commitments_raise_decode_error(value):
    """A chain client handing over a str, int, None or a list is refused the same way."""
    try:
        decode_commitment(value)
    except CommitmentDecodeError:
        return
    assert isinstance(value, bytearray)  # only a well-formed bytearray may decode


def test_commitment_with_traversal_repo_is_refused():
    """A reveal hand-packed around the encoder with repo ``../../etc`` never becomes a payload."""
    for repo in (b"../../etc", b"a/../b", b"/abs", b"a/b/c", b"a\\b"):
        revision = bytes.fromhex("ab" * 32)
        body = struct.pack(">IBB", 9, 1, len(revision)) + revision + b"d" * 16 + bytes([len(repo)]) + repo
        with pytest.raises(CommitmentDecodeError, match="repo"):
            decode_commitment(b"cn\x01R" + body)


# --- domain config loader ---------------------------------------------------------------------

_BASE_CONFIG: dict[str, Any] = yaml.safe_load(TINY_MATH.read_text())
_yaml_values = _json_values | st.sampled_from(
    [float("inf"), float("nan"), -1, 0, 2**64, True, "library:1", "library", [], {}]
)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list config, sections and leaves alike."""
    paths = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            paths += _paths(value, (*prefix, index))
    return paths


_CONFIG_PATHS = _paths(_BASE_CONFIG)


@st.composite
def _mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(_BASE_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_CONFIG_PATHS))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            op = draw(st.sampled_from(["replace", "delete", "add"]))
            if op == "replace":
                parent[path[-1]] = draw(_yaml_values)
            elif op == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(_yaml_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the path
    return data


@FUZZ
@given(data=_mutated_config())
def test_config_mutations_parse_or_raise_config_error(data):
    """Any edit of a real domain config: a DomainConfig whose digest round-trips, or ConfigError."""
    try:
        config = parse_domain_config(data, path="fuzz.yaml")
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz.yaml")
        return
    assert parse_domain_config(config.model_dump(mode="json")) == config
    assert len(config_digest(config)) == 64


_YAML_SNIPPETS = [
    "!!python/object/apply:os.system ['true']",
    "!!int abc",
    "!!float abc",
    "!!timestamp 2020-13-45",
    "!!timestamp abc",
    "!!bool abc",
    "!!int ",
    "!!binary '%%%'",
    "!!set {a, b}",
    "&anchor",
    "*anchor",
    "<<: 5",
    "<<: *missing",
    "[" * 2000,
    "{a: " * 1500,
    "9" * 5000,
    "\t",
    "\x00",
    "%YAML 9.9\n---",
    "---\n...\n---",
    "? [1, 2]\n: 3",
    ".inf",
    ".nan",
    "2001-12-14t21:59:43.10+99:00",
    "'unterminated",
]


@FUZZ
@given(
    inserts=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(_YAML_SNIPPETS) | st.text(max_size=10)),
        min_size=1,
        max_size=3,
    )
)
def test_yaml_text_mutations_load_or_raise_config_error(tmp_path, inserts):
    """Hostile YAML spliced into a real config file: DomainConfig or ConfigError, never a raw
    ValueError, RecursionError or a constructor running code."""
    text = TINY_MATH.read_text()
    for where, snippet in inserts:
        position = where % (len(text) + 1)
        text = text[:position] + snippet + text[position:]
    path = _fresh(tmp_path).with_suffix(".yaml")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_domain_config(path)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(config, DomainConfig) and len(config_digest(config)) == 64


@pytest.mark.parametrize(
    "snippet",
    [
        "!!int abc",
        "!!int ",
        "!!float ",
        "!!bool abc",
        "!!timestamp abc",
        "!!timestamp 2020-13-45",
        "!!timestamp 2001-12-14t21:59:43.10+99:00",
        "9" * 5000,
        "[" * 5000 + "]" * 5000,
        "{a: " * 3000 + "1" + "}" * 3000,
    ],
    ids=lambda snippet: snippet[:24],
)
def test_yaml_constructor_errors_are_config_errors(tmp_path, snippet):
    """PyYAML's safe constructors raise KeyError, IndexError, AttributeError, ValueError or
    RecursionError on such scalars; the loader reports each as one ConfigError line."""
    path = tmp_path / "domain.yaml"
    path.write_text(TINY_MATH.read_text().replace("netuid: 0", f"netuid: {snippet}", 1))
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_domain_config(path)
    assert "\n" not in str(info.value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=400))
def test_random_config_bytes_raise_config_error(tmp_path, blob):
    path = _fresh(tmp_path).with_suffix(".yaml")
    path.write_bytes(blob)
    with pytest.raises(ConfigError):
        load_domain_config(path)


@pytest.mark.parametrize(
    "inline_extra",
    [
        pytest.param({"when": "2020-01-01"}, id="date"),
        pytest.param({"blob": "!!binary /w=="}, id="bytes"),
        pytest.param({"deep": "[" * 40 + "]" * 40}, id="deep"),
    ],
)
def test_inline_model_config_must_be_plain_json(tmp_path, inline_extra):
    """YAML dates, bytes and deep nesting in model.inline would break config_digest at node start;
    they are refused at load time instead."""
    ((key, value),) = inline_extra.items()
    text = TINY_MATH.read_text().replace("  inline:\n", f"  inline:\n    {key}: {value}\n", 1)
    path = tmp_path / "domain.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="model"):
        load_domain_config(path)


def test_billion_laughs_inline_is_refused_quickly(tmp_path):
    """Nine levels of ten aliases (10**9 values) in model.inline are refused by a value budget."""
    levels = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        levels.append(f"    l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    text = TINY_MATH.read_text().replace("  inline:\n", "  inline:\n" + "\n".join(levels) + "\n", 1)
    path = tmp_path / "domain.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="100000 values"):
        load_domain_config(path)
