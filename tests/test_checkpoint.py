"""Expert checkpoints: bit-exact round trip, canonical digest, and the strict loader's rejections."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import MODEL_TYPES, make_selection, tiny_config, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connito.protocol.safetensors_header as header_module
import connito.protocol.strict_loader as loader_module
from connito.errors import ConfigError, InvalidSubmission
from connito.ml.moe import expert_key, read_experts
from connito.ml.selection_record import LayerSelection, save_selection
from connito.protocol.checkpoint import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    ExpertSpec,
    Manifest,
    expected_expert_specs,
    selected_keys,
    tensors_digest,
    write_checkpoint,
)
from connito.protocol.safetensors_header import read_safetensors_header
from connito.protocol.strict_loader import load_checkpoint, verify_checkpoint_cli

HIDDEN, INTER = 32, 16  # the tiny qwen3_moe of conftest
MAX_BYTES = 1 << 20
HOTKEY = "5FminerHotkey"
SELECTION = make_selection({0: (1, 3), 1: (5,)})
KEYS = selected_keys(SELECTION)
FIRST_KEY = expert_key(0, 1, "gate_proj")


def _specs(dtype: torch.dtype = torch.float32) -> dict[str, ExpertSpec]:
    shapes = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    return {key: ExpertSpec(shapes[key.split(".")[-2]], dtype) for key in KEYS}


def _state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(spec.shape, generator=generator).to(dtype) for key, spec in _specs().items()}


def _fields(**overrides) -> dict:
    fields = dict(
        kind="submission",
        domain=SELECTION.domain,
        model_id=SELECTION.model_id,
        model_revision=SELECTION.model_revision,
        selection_digest=SELECTION.digest,
        cycle=3,
        global_revision="0123abcd",
        hotkey=HOTKEY,
        created_block=120,
    )
    fields.update(overrides)
    return fields


def _write(folder: Path, state: dict[str, torch.Tensor] | None = None, **overrides) -> Manifest:
    return write_checkpoint(folder, _state() if state is None else state, **_fields(**overrides))


def _write_raw(folder: Path, tensors: dict[str, torch.Tensor], **overrides) -> None:
    """A checkpoint written around the writer's checks, with a manifest that matches the tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(folder / EXPERTS_FILE))
    fields = _fields(tensors_sha256=tensors_digest(tensors), **overrides)
    (folder / MANIFEST_FILE).write_bytes(Manifest(**fields).to_json())


def _write_manifest_json(folder: Path, **changes) -> None:
    body = json.loads((folder / MANIFEST_FILE).read_bytes())
    body.update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(body))


def _raw_file(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _load(folder: Path, *, expected=None, use_specs: bool = True, **kwargs):
    return load_checkpoint(
        folder,
        selection=SELECTION,
        expected=(_specs() if expected is None else expected) if use_specs else None,
        max_bytes=kwargs.pop("max_bytes", MAX_BYTES),
        hotkey=HOTKEY,
        cycle=3,
        **kwargs,
    )


def _reject(folder: Path, reason: str, named: str, **kwargs) -> InvalidSubmission:
    with pytest.raises(InvalidSubmission) as info:
        _load(folder, **kwargs)
    err = info.value
    assert err.reason == reason, str(err)
    assert named in str(err)
    assert f"hotkey={HOTKEY} cycle=3" in str(err) and "\n" not in str(err)
    return err


# --- round trip and digest ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    """What the writer saved, the loader returns bit for bit, with a digest that matches it."""
    state = _state(dtype=dtype)
    state[FIRST_KEY][0, 0] = -0.0  # the sign of zero survives
    manifest = _write(tmp_path / "ckpt", state)
    loaded_manifest, loaded = _load(tmp_path / "ckpt", expected=_specs(dtype))
    assert loaded_manifest == manifest
    assert sorted(loaded) == KEYS
    for key in KEYS:
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], state[key])
    assert torch.signbit(loaded[FIRST_KEY][0, 0])
    assert manifest.tensors_sha256 == tensors_digest(state) == tensors_digest(loaded)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [EXPERTS_FILE, MANIFEST_FILE]


def test_manifest_encode_decode_round_trips():
    manifest = Manifest(**_fields(tensors_sha256="ab" * 32))
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_digest_is_independent_of_order_and_serialization():
    state = _state()
    reordered = dict(reversed(list(state.items())))
    reread = safetensors.torch.load(safetensors.torch.save({k: v.clone() for k, v in reordered.items()}))
    assert tensors_digest(state) == tensors_digest(reordered) == tensors_digest(reread)


def test_digest_changes_with_bits_dtype_shape_and_key():
    state = _state()
    base = tensors_digest(state)
    flipped = dict(state, **{FIRST_KEY: state[FIRST_KEY].clone()})
    flipped[FIRST_KEY].view(torch.int32)[0, 0] ^= 1  # one mantissa bit
    same_bytes_other_dtype = dict(state, **{FIRST_KEY: state[FIRST_KEY].view(torch.int32)})
    reshaped = dict(state, **{FIRST_KEY: state[FIRST_KEY].reshape(HIDDEN, INTER)})
    renamed = {k.replace("experts.1.", "experts.2."): v for k, v in state.items()}
    digests = {tensors_digest(s) for s in (flipped, same_bytes_other_dtype, reshaped, renamed)}
    assert base not in digests and len(digests) == 4


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40))
def test_digest_survives_a_safetensors_round_trip(values):
    state = {FIRST_KEY: torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)}
    reread = safetensors.torch.load(safetensors.torch.save(state))
    assert tensors_digest(reread) == tensors_digest(state)


def test_write_replaces_an_existing_checkpoint_without_leftovers(tmp_path):
    _write(tmp_path / "ckpt", _state(seed=1))
    second = _write(tmp_path / "ckpt", _state(seed=2), cycle=4)
    manifest, loaded = _load(tmp_path / "ckpt")
    assert manifest == second and torch.equal(loaded[FIRST_KEY], _state(seed=2)[FIRST_KEY])
    assert os.listdir(tmp_path) == ["ckpt"]


def test_writer_refuses_non_expert_keys(tmp_path):
    with pytest.raises(ValueError, match="not an expert key"):
        _write(tmp_path / "ckpt", {"model.layers.0.mlp.gate.weight": torch.zeros(8, HIDDEN)})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_expected_specs_match_the_model_experts(model_type):
    """expected_expert_specs agrees with the tensors read_experts takes out of every family."""
    model = tiny_model(model_type)
    selection = SELECTION.model_copy(update={"model_type": model_type}).sealed()
    specs = expected_expert_specs(model, selection)
    experts = read_experts(model, SELECTION.experts_by_layer)
    assert sorted(specs) == sorted(experts) == selected_keys(selection)
    for key, tensor in experts.items():
        assert specs[key] == (tuple(tensor.shape), tensor.dtype)


def test_expected_specs_refuse_a_selection_for_another_family():
    selection = SELECTION.model_copy(update={"model_type": "mixtral"}).sealed()
    with pytest.raises(ConfigError, match="model_type"):
        expected_expert_specs(tiny_model("qwen3_moe"), selection)


def test_expected_specs_refuse_a_selection_beyond_the_model():
    model = tiny_model("qwen3_moe")
    beyond = SELECTION.model_copy(update={"layers": (LayerSelection(layer=5, experts=(0,), scores=(0.1,)),)})
    with pytest.raises(ConfigError, match="layer 5"):
        expected_expert_specs(model, beyond)
    too_many = SELECTION.model_copy(
        update={"layers": (LayerSelection(layer=0, experts=(9,), scores=(0.1,) * 10),)}
    )
    with pytest.raises(ConfigError, match="expert 9"):
        expected_expert_specs(model, too_many)


# --- rejections: one malformed fixture per reason ----------------------------------------------


@pytest.mark.parametrize("name", [MANIFEST_FILE, EXPERTS_FILE])
def test_missing_file_is_rejected(tmp_path, name):
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / name).unlink()
    _reject(tmp_path / "ckpt", "missing_file", name)


def test_missing_folder_is_rejected(tmp_path):
    _reject(tmp_path / "nowhere", "missing_file", "nowhere")


def test_directory_in_place_of_a_file_is_rejected(tmp_path):
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / EXPERTS_FILE).unlink()
    (tmp_path / "ckpt" / EXPERTS_FILE).mkdir()
    _reject(tmp_path / "ckpt", "missing_file", EXPERTS_FILE)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "sub", ".hidden", "evil\nname"])
def test_extra_file_is_rejected(tmp_path, name):
    _write(tmp_path / "ckpt")
    if name == "sub":
        (tmp_path / "ckpt" / name).mkdir()
    else:
        (tmp_path / "ckpt" / name).write_bytes(b"x")
    _reject(tmp_path / "ckpt", "extra_file", name.replace("\n", "\\n"))


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    """A file 10x over the cap costs a stat: the loader opens nothing."""
    folder = tmp_path / "ckpt"
    _write(folder)
    os.truncate(folder / EXPERTS_FILE, 10 * MAX_BYTES)  # sparse: no disk used

    def refuse(*args, **kwargs):
        raise AssertionError(f"read attempted: {args}")

    monkeypatch.setattr(loader_module, "open", refuse, raising=False)
    monkeypatch.setattr(header_module, "open", refuse, raising=False)
    monkeypatch.setattr(loader_module, "safe_open", refuse)
    err = _reject(folder, "too_large", EXPERTS_FILE)
    assert str(10 * MAX_BYTES) in str(err)


def _manifest_cases():
    long = "x" * 300
    return {
        "not_json": b"{not json",
        "extra_field": {"trusted": True},
        "schema_version": {"schema_version": 2},
        "kind": {"kind": "merge"},
        "digest_not_hex": {"tensors_sha256": "Z" * 64},
        "hotkey_too_long": {"hotkey": long},
        "control_char": {"domain": "ma\nth"},
        "negative_cycle": {"cycle": -1},
        "string_cycle": {"cycle": "3"},
        "missing_field": None,
        "oversized": b" " * 70_000,
    }


@pytest.mark.parametrize("case", list(_manifest_cases()))
def test_bad_manifest_is_rejected(tmp_path, case):
    folder = tmp_path / "ckpt"
    _write(folder)
    change = _manifest_cases()[case]
    path = folder / MANIFEST_FILE
    if isinstance(change, bytes):
        path.write_bytes(change if case != "oversized" else path.read_bytes() + change)
    elif change is None:
        body = json.loads(path.read_bytes())
        del body["hotkey"]
        path.write_text(json.dumps(body))
    else:
        _write_manifest_json(folder, **change)
    _reject(folder, "bad_manifest", MANIFEST_FILE)


@pytest.mark.parametrize(
    "field,value",
    [
        ("selection_digest", "cd" * 32),
        ("domain", "code"),
        ("model_id", "inline:olmoe"),
        ("model_revision", "v2"),
    ],
)
def test_manifest_for_another_selection_is_rejected(tmp_path, field, value):
    _write(tmp_path / "ckpt", **{field: value})
    _reject(tmp_path / "ckpt", "wrong_selection", field)


def test_pickle_renamed_to_safetensors_is_never_unpickled(tmp_path):
    """A hostile pickle (it would create a marker file when unpickled) is refused as data."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Detonator(marker))
    for writer in (lambda p: p.write_bytes(payload), lambda p: torch.save({"x": _Detonator(marker)}, p)):
        folder = tmp_path / "ckpt"
        _write(folder)
        writer(folder / EXPERTS_FILE)
        _reject(folder, "not_safetensors", EXPERTS_FILE)
        assert not marker.exists()
    pickle.loads(payload)  # the fixture is live: unpickling it does run code
    assert marker.exists()


class _Detonator:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _valid_entry(key: str = FIRST_KEY) -> dict:
    return {key: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x01\x02", id="shorter_than_length_field"),
        pytest.param(struct.pack("<Q", 2**63) + b"{}", id="huge_header_length"),
        pytest.param(struct.pack("<Q", 100) + b"{}", id="header_past_eof"),
        pytest.param(_raw_file(b"\xff\xfe{}"), id="header_not_utf8"),
        pytest.param(_raw_file(b"{not json"), id="header_not_json"),
        pytest.param(_raw_file(b"[" * 100_000 + b"]" * 100_000), id="deeply_nested"),
        pytest.param(_raw_file([1, 2]), id="header_not_object"),
        pytest.param(_raw_file(b'{"a": {}, "a": {}}'), id="duplicate_keys"),
        pytest.param(
            _raw_file({**_valid_entry(), "__metadata__": {"a": 1}}, bytes(8)), id="metadata_not_str"
        ),
        pytest.param(_raw_file({FIRST_KEY: {"dtype": "F32", "shape": [2]}}, bytes(8)), id="entry_fields"),
        pytest.param(
            _raw_file({FIRST_KEY: {"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}}), id="dtype"
        ),
        pytest.param(
            _raw_file({FIRST_KEY: {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), id="shape"
        ),
        pytest.param(
            _raw_file({FIRST_KEY: {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}), id="past_eof"
        ),
        pytest.param(_raw_file(_valid_entry(), bytes(12)), id="trailing_payload"),
        pytest.param(
            _raw_file(
                {**_valid_entry(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)
            ),
            id="overlapping",
        ),
    ],
)
def test_malformed_safetensors_is_rejected(tmp_path, raw):
    folder = tmp_path / "ckpt"
    _write(folder)
    (folder / EXPERTS_FILE).write_bytes(raw)
    _reject(folder, "not_safetensors", EXPERTS_FILE)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.mlp.gate.weight",  # the router
        "model.layers.0.self_attn.q_proj.weight",
        expert_key(0, 2, "up_proj"),  # an unselected expert
        expert_key(1, 1, "up_proj"),  # selected in layer 0 only
    ],
)
def test_extra_key_is_rejected(tmp_path, extra):
    tensors = {**_state(), extra: torch.zeros(INTER, HIDDEN)}
    _write_raw(tmp_path / "ckpt", tensors)
    err = _reject(tmp_path / "ckpt", "extra_key", extra)
    assert err.key == extra


def test_missing_key_is_rejected(tmp_path):
    state = _state()
    dropped = expert_key(1, 5, "down_proj")
    del state[dropped]
    _write(tmp_path / "ckpt", state)
    assert _reject(tmp_path / "ckpt", "missing_key", dropped).key == dropped


def test_wrong_shape_is_rejected(tmp_path):
    state = _state()
    state[FIRST_KEY] = state[FIRST_KEY].T.contiguous()
    _write(tmp_path / "ckpt", state)
    err = _reject(tmp_path / "ckpt", "shape", FIRST_KEY)
    assert f"({HIDDEN}, {INTER})" in str(err) and f"({INTER}, {HIDDEN})" in str(err)


def test_wrong_dtype_is_rejected(tmp_path):
    state = _state()
    state[FIRST_KEY] = state[FIRST_KEY].half()
    _write(tmp_path / "ckpt", state)
    assert "F16" in str(_reject(tmp_path / "ckpt", "dtype", FIRST_KEY))


def test_manifest_digest_mismatch_is_rejected(tmp_path):
    _write(tmp_path / "ckpt")
    _write_manifest_json(tmp_path / "ckpt", tensors_sha256="0" * 64)
    _reject(tmp_path / "ckpt", "digest_mismatch", EXPERTS_FILE)


def test_tensors_swapped_under_the_manifest_are_rejected(tmp_path):
    _write(tmp_path / "ckpt", _state(seed=1))
    safetensors.torch.save_file(_state(seed=2), str(tmp_path / "ckpt" / EXPERTS_FILE))
    _reject(tmp_path / "ckpt", "digest_mismatch", EXPERTS_FILE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_is_rejected(tmp_path, bad):
    state = _state(dtype=torch.bfloat16)
    poisoned = expert_key(0, 3, "up_proj")
    state[poisoned][2, 5] = bad
    _write(tmp_path / "ckpt", state)
    assert _reject(tmp_path / "ckpt", "non_finite", poisoned, expected=_specs(torch.bfloat16)).key == poisoned


def test_expected_specs_must_cover_the_selection(tmp_path):
    _write(tmp_path / "ckpt")
    partial = dict(list(_specs().items())[:-1])
    with pytest.raises(ValueError, match="selected keys"):
        _load(tmp_path / "ckpt", expected=partial)


# --- self-consistency mode (no base model) -----------------------------------------------------


def test_self_consistency_accepts_a_valid_checkpoint(tmp_path):
    state = _state(dtype=torch.bfloat16)
    _write(tmp_path / "ckpt", state)
    _, loaded = _load(tmp_path / "ckpt", use_specs=False)
    assert all(torch.equal(loaded[k], state[k]) for k in KEYS)


def test_self_consistency_rejects_gate_inconsistent_with_down(tmp_path):
    state = _state()
    bad = expert_key(0, 3, "gate_proj")
    state[bad] = torch.zeros(INTER + 1, HIDDEN)
    _write(tmp_path / "ckpt", state)
    _reject(tmp_path / "ckpt", "shape", bad, use_specs=False)


def test_self_consistency_rejects_mixed_or_integer_dtypes(tmp_path):
    state = _state()
    mixed = expert_key(1, 5, "up_proj")
    state[mixed] = state[mixed].bfloat16()
    _write(tmp_path / "ckpt", state)
    _reject(tmp_path / "ckpt", "dtype", mixed, use_specs=False)
    ints = {key: tensor.to(torch.int32) for key, tensor in _state().items()}
    _write(tmp_path / "ckpt", ints)
    _reject(tmp_path / "ckpt", "dtype", KEYS[0], use_specs=False)


# --- fuzz: untrusted bytes only ever raise InvalidSubmission -----------------------------------

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(blob=st.binary(max_size=512))
def test_random_experts_bytes_raise_only_invalid_submission(tmp_path, blob):
    folder = tmp_path / "fuzz"
    if not folder.exists():
        _write(folder)
    (folder / EXPERTS_FILE).write_bytes(blob)
    with pytest.raises(InvalidSubmission):
        _load(folder)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "X"]),
        "shape": st.lists(st.integers(-1, 40), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 4000), min_size=0, max_size=3),
    }
)


@_FUZZ
@given(
    header=st.dictionaries(st.sampled_from([*KEYS[:3], "x", "__metadata__"]), _ENTRY | _JSON, max_size=4),
    data=st.binary(max_size=64),
)
def test_structured_header_fuzz_raises_only_invalid_submission(tmp_path, header, data):
    folder = tmp_path / "fuzz"
    if not folder.exists():
        _write(folder)
    (folder / EXPERTS_FILE).write_bytes(_raw_file(json.dumps(header).encode(), data))
    with pytest.raises(InvalidSubmission):
        _load(folder)


@_FUZZ
@given(blob=st.binary(max_size=512) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_random_manifest_bytes_raise_only_invalid_submission(tmp_path, blob):
    folder = tmp_path / "fuzz"
    if not folder.exists():
        _write(folder)
    (folder / MANIFEST_FILE).write_bytes(blob)
    with pytest.raises(InvalidSubmission) as info:
        _load(folder)
    assert info.value.reason == "bad_manifest"


def test_header_reader_sees_no_tensor_bytes(tmp_path):
    """read_safetensors_header validates layout from the header alone (offsets, dtypes, shapes)."""
    _write(tmp_path / "ckpt")
    header = read_safetensors_header(tmp_path / "ckpt" / EXPERTS_FILE, max_bytes=MAX_BYTES)
    assert sorted(header) == KEYS
    assert header[FIRST_KEY].dtype == "F32" and header[FIRST_KEY].shape == (INTER, HIDDEN)


# --- verify-checkpoint -------------------------------------------------------------------------


def test_verify_cli_accepts_a_valid_checkpoint(tmp_path, capsys):
    save_selection(SELECTION, tmp_path / "selection.json")
    _write(tmp_path / "ckpt")
    assert verify_checkpoint_cli(tmp_path / "ckpt", tmp_path / "selection.json", max_bytes=MAX_BYTES) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "ok" in out and tensors_digest(_state()) in out


def test_verify_cli_rejects_with_one_line(tmp_path, capsys):
    save_selection(SELECTION, tmp_path / "selection.json")
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "extra.txt").write_text("x")
    assert verify_checkpoint_cli(tmp_path / "ckpt", tmp_path / "selection.json", max_bytes=MAX_BYTES) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "extra_file" in err and "extra.txt" in err


def test_verify_cli_checks_shapes_against_a_model_folder(tmp_path, capsys):
    """Consistent but wrongly sized experts pass self-consistency and fail against the model."""
    save_selection(SELECTION, tmp_path / "selection.json")
    tiny_config("qwen3_moe").save_pretrained(tmp_path / "model")
    halved = {
        k: (v[: INTER // 2] if "down" not in k else v[:, : INTER // 2]).contiguous()
        for k, v in _state().items()
    }
    _write(tmp_path / "ckpt", halved)
    args = (tmp_path / "ckpt", tmp_path / "selection.json")
    assert verify_checkpoint_cli(*args, max_bytes=MAX_BYTES) == 0
    assert verify_checkpoint_cli(*args, max_bytes=MAX_BYTES, model_dir=tmp_path / "model") == 1
    assert "shape" in capsys.readouterr().err


def test_verify_cli_usage_error_for_a_bad_selection(tmp_path, capsys):
    _write(tmp_path / "ckpt")
    (tmp_path / "selection.json").write_text("{}")
    assert verify_checkpoint_cli(tmp_path / "ckpt", tmp_path / "selection.json", max_bytes=MAX_BYTES) == 2
    assert capsys.readouterr().err.count("\n") == 1
