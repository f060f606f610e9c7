"""int8 delta payloads: bounded round-trip error, strict loading, and Proof-of-Loss close to fp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_selection, random_batch, tiny_model

from connito.config import ScoringConfig, TrainingConfig
from connito.errors import InvalidSubmission
from connito.ml.moe import read_experts
from connito.ml.selection_record import save_selection
from connito.ml.training import SparseTrainer
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
from connito.protocol.payload import INT8_MAX, decode_int8_delta, encode_int8_delta, scale_key
from connito.protocol.scoring import Candidate, score_submissions
from connito.protocol.strict_loader import load_checkpoint, verify_checkpoint_cli

SELECTION = make_selection({0: (1, 3), 1: (5,)})
BY_LAYER = SELECTION.experts_by_layer
KEYS = selected_keys(SELECTION)
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global experts, experts after a few sparse AdamW steps) of the tiny qwen3_moe."""
    model = tiny_model("qwen3_moe")
    base = read_experts(model, BY_LAYER)
    trainer = SparseTrainer(model, BY_LAYER, TrainingConfig(lr=1e-2, batch_size=2))
    trainer.train([random_batch(seed=i) for i in range(6)], 6, progress=False)
    return base, trainer.finish()


def _write(folder: Path, experts, base, *, encoding: str = "int8") -> Manifest:
    return write_checkpoint(
        folder,
        experts,
        kind="submission",
        domain=SELECTION.domain,
        model_id=SELECTION.model_id,
        model_revision=SELECTION.model_revision,
        selection_digest=SELECTION.digest,
        cycle=3,
        global_revision=tensors_digest(base),
        hotkey="5Fminer",
        encoding=encoding,
        base=base,
    )


def _specs(base) -> dict[str, ExpertSpec]:
    return {key: ExpertSpec(tuple(t.shape), t.dtype) for key, t in base.items()}


def _load(folder: Path, base, *, decode_with=...):
    """Load with the expected specs of ``base``, decoding against ``decode_with`` (default: ``base``)."""
    return load_checkpoint(
        folder,
        selection=SELECTION,
        expected=_specs(base),
        max_bytes=MAX_BYTES,
        base=base if decode_with is ... else decode_with,
    )


def test_round_trip_error_is_at_most_half_a_step_per_row(trained):
    """|decode(encode(W)) - W| <= scale/2 per row (plus fp32 rounding); unchanged rows decode exactly."""
    base, experts = trained
    experts = dict(experts)
    untouched = KEYS[0]
    experts[untouched] = base[untouched].clone()
    payload = encode_int8_delta(experts, base)
    decoded = decode_int8_delta(payload, base)
    for key in KEYS:
        assert payload[key].dtype == torch.int8 and int(payload[key].abs().max()) <= INT8_MAX
        scale = payload[scale_key(key)]
        error = (decoded[key] - experts[key]).abs()
        bound = scale[:, None] / 2 + 1e-6 * experts[key].abs()
        assert bool((error <= bound).all()), key
        assert decoded[key].dtype == base[key].dtype
    assert torch.equal(decoded[untouched], base[untouched])
    assert not torch.equal(decoded[KEYS[1]], base[KEYS[1]])


def test_int8_checkpoint_round_trips_and_the_digest_covers_the_uploaded_tensors(tmp_path, trained):
    """The manifest says int8 (schema 2); its digest is of q and scales; the loader returns decoded experts."""
    base, experts = trained
    manifest = _write(tmp_path / "c", experts, base)
    assert (manifest.encoding, manifest.schema_version) == ("int8", 2)
    raw = safetensors.torch.load_file(str(tmp_path / "c" / EXPERTS_FILE))
    assert sorted(raw) == sorted([*KEYS, *(scale_key(k) for k in KEYS)])
    assert manifest.tensors_sha256 == tensors_digest(raw) != tensors_digest(experts)
    loaded_manifest, state = _load(tmp_path / "c", base)
    assert loaded_manifest == manifest
    assert torch.equal(torch.cat([state[k].reshape(-1) for k in KEYS]), torch.cat([
        decode_int8_delta(raw, base)[k].reshape(-1) for k in KEYS
    ]))  # fmt: skip
    fp_manifest = _write(tmp_path / "f", experts, base, encoding="fp")
    assert (fp_manifest.schema_version, b'"encoding"' in (tmp_path / "f" / MANIFEST_FILE).read_bytes()) == (
        1,
        False,
    )
    fp_bytes = (tmp_path / "f" / EXPERTS_FILE).stat().st_size
    assert (tmp_path / "c" / EXPERTS_FILE).stat().st_size < 0.4 * fp_bytes  # fp32 model: ~4x smaller


def _tamper(folder: Path, change) -> None:
    """Rewrite the payload tensors and re-seal the manifest digest (a miner can always do that)."""
    tensors = safetensors.torch.load_file(str(folder / EXPERTS_FILE))
    change(tensors)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / EXPERTS_FILE))
    body = json.loads((folder / MANIFEST_FILE).read_bytes())
    body["tensors_sha256"] = tensors_digest(tensors)
    (folder / MANIFEST_FILE).write_text(json.dumps(body))


def _set(key: str, value):
    def change(tensors):
        tensors[key] = value(tensors[key])

    return change


SCALE = scale_key(KEYS[0])
BAD_PAYLOADS = {
    "nan_scale": (
        _set(SCALE, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
        "non_finite",
        SCALE,
    ),
    "inf_scale": (
        _set(SCALE, lambda t: t.index_fill(0, torch.tensor([2]), float("inf"))),
        "non_finite",
        SCALE,
    ),
    "negative_scale": (_set(SCALE, lambda t: -t - 1.0), "out_of_range", SCALE),
    "q_minus_128": (
        _set(KEYS[0], lambda t: t.index_fill(0, torch.tensor([1]), -128)),
        "out_of_range",
        KEYS[0],
    ),
    "q_float": (_set(KEYS[0], lambda t: t.float()), "dtype", KEYS[0]),
    "q_int16": (_set(KEYS[0], lambda t: t.to(torch.int16)), "dtype", KEYS[0]),
    "scale_bf16": (_set(SCALE, lambda t: t.to(torch.bfloat16)), "dtype", SCALE),
    "scale_shape": (_set(SCALE, lambda t: t[:-1]), "shape", SCALE),
    "q_shape": (_set(KEYS[0], lambda t: t[:, :-1]), "shape", KEYS[0]),
    "scale_missing": (lambda tensors: tensors.pop(SCALE), "missing_key", SCALE),
    "extra_key": (lambda tensors: tensors.update(bonus=torch.zeros(2)), "extra_key", "bonus"),
    "huge_scale": (_set(SCALE, lambda t: torch.full_like(t, 3e38)), "non_finite", KEYS[0]),
}


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
def test_malformed_int8_payload_is_rejected_naming_the_key(tmp_path, trained, case):
    """q and scales are held to dtype, shape, finiteness and the encoder's bounds, after the digest."""
    base, experts = trained
    change, reason, key = BAD_PAYLOADS[case]
    _write(tmp_path / "c", experts, base)
    _tamper(tmp_path / "c", change)
    with pytest.raises(InvalidSubmission) as info:
        _load(tmp_path / "c", base)
    assert info.value.reason == reason
    assert key in str(info.value) and "\n" not in str(info.value)


def test_int8_payload_needs_the_global_it_was_trained_from(tmp_path, trained):
    """Without a base the payload is refused (no_base); against another global it is stale."""
    base, experts = trained
    _write(tmp_path / "c", experts, base)
    with pytest.raises(InvalidSubmission) as info:
        _load(tmp_path / "c", base, decode_with=None)
    assert info.value.reason == "no_base"
    other = {key: tensor + 1e-3 for key, tensor in base.items()}
    with pytest.raises(InvalidSubmission) as info:
        _load(tmp_path / "c", other)
    assert info.value.reason == "stale"


@pytest.mark.parametrize(
    "change",
    [{"schema_version": 1}, {"encoding": "fp"}, {"encoding": "int4"}, {"kind": "global"}],
    ids=["v1_int8", "v2_fp", "unknown_encoding", "int8_global"],
)
def test_manifest_encoding_must_match_its_schema_version_and_kind(tmp_path, trained, change):
    base, experts = trained
    _write(tmp_path / "c", experts, base)
    body = json.loads((tmp_path / "c" / MANIFEST_FILE).read_bytes())
    body.update(change)
    (tmp_path / "c" / MANIFEST_FILE).write_text(json.dumps(body))
    with pytest.raises(InvalidSubmission) as info:
        _load(tmp_path / "c", base)
    assert info.value.reason == "bad_manifest"


def test_verify_checkpoint_accepts_an_int8_payload_without_decoding(tmp_path, trained, capsys):
    base, experts = trained
    _write(tmp_path / "c", experts, base)
    save_selection(SELECTION, tmp_path / "selection.json")
    model = tiny_model("qwen3_moe")
    assert expected_expert_specs(model, SELECTION) == _specs(base)
    assert (
        verify_checkpoint_cli(tmp_path / "c", tmp_path / "selection.json", max_bytes=MAX_BYTES, model=model)
        == 0
    )
    assert "encoding=int8" in capsys.readouterr().out
    _tamper(tmp_path / "c", BAD_PAYLOADS["nan_scale"][0])
    assert (
        verify_checkpoint_cli(tmp_path / "c", tmp_path / "selection.json", max_bytes=MAX_BYTES, model=model)
        == 1
    )


def test_int8_submission_scores_like_the_fp_one(tmp_path, trained):
    """Proof-of-Loss of the decoded int8 submission is within 0.1% of the fp submission's, both accepted."""
    base, experts = trained
    model = tiny_model("qwen3_moe")
    batches = [random_batch(batch_size=4, seed=50 + i) for i in range(3)]
    config = ScoringConfig(eval_batches=3, eval_batch_size=4, general_batches=0)
    scores = {}
    for encoding in ("fp", "int8"):
        manifest = _write(tmp_path / encoding, experts, base, encoding=encoding)
        _, state = _load(tmp_path / encoding, base)
        candidate = Candidate(
            hotkey=encoding, uid=1, commit_block=1, tensors_sha256=manifest.tensors_sha256, state=state
        )
        (global_loss, _), (score,) = score_submissions(
            model, base, [candidate], domain_batches=batches, general_batches=[], config=config
        )
        scores[encoding] = score
    assert scores["fp"].accepted and scores["int8"].accepted, scores
    assert scores["int8"].domain_loss == pytest.approx(scores["fp"].domain_loss, rel=1e-3)
    assert scores["int8"].utility == pytest.approx(scores["fp"].utility, rel=0.05)


def test_int8_miners_are_scored_merged_and_the_merge_recomputed(tmp_path, caplog):
    """In-process subnet with int8 payloads: validators accept them, the lead merges, the other
    validator decodes the same bits and adopts the merge only after recomputing it digest for digest."""
    from e2e_harness import build_subnet, domain_config

    from connito.protocol.phases import phase_bounds

    config = domain_config(training__payload="int8")
    subnet = build_subnet(tmp_path, config, miners=2, validators=2)
    _, end = phase_bounds(0, "merge", config.cycle)
    with caplog.at_level("INFO", logger="connito.node"):
        subnet.run_until(end)
    lead, other = subnet.nodes["v0"], subnet.nodes["v1"]
    manifest = json.loads((tmp_path / "nodes" / "m0" / "checkpoints" / "0" / MANIFEST_FILE).read_bytes())
    assert manifest["encoding"] == "int8"
    result = lead.state.results[0]
    assert [row.accepted for row in result.scores] == [True, True], [
        (r.reason, r.detail) for r in result.scores
    ]
    assert result.decision in ("merged", "best_single")
    assert other.state.results[0].decision == "adopted"
    assert other.global_state.revision == lead.global_state.revision == result.result_revision
    assert "cycle=0 merge verified" in caplog.text  # recomputed from its own decoded payloads
