"""kill -9 of the lead validator at any point of evaluation, weights, merge, upload and state
writes, then a restart: the cycle ends exactly as an uninterrupted run does.

A world is built once (two honest miners committed and revealed in cycle 0); every case copies
it, runs ``tests/kill9_child.py`` with a SIGKILL at one hook call, restarts it without one, and
compares with a clean run: one global publication (no double merge), the same scores, decision,
EMA and weights (no lost score history), and no temp file or unreadable file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import build_subnet, domain_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from connito.chain.local import LocalChain
from connito.node.validator_state import ValidatorState
from connito.protocol.commitments import GlobalPayload, decode_commitment
from connito.protocol.phases import phase_bounds

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parent / "kill9_child.py"
CHILD_TIMEOUT_S = 300

# one kill point in each stage the issue names: evaluation, weights, merge, upload, commit, state
STAGE_KILL_POINTS = [
    ("batch_losses", 2, "before"),  # mid-evaluation: the global scored, a submission not yet
    ("chain.set_weights", 1, "after"),  # weights on chain, the state not yet saved
    ("apply_merge", 1, "after"),  # merged in memory, nothing written
    ("save_global", 1, "after"),  # the global folder written, not uploaded
    ("store.upload", 1, "after"),  # uploaded, not committed
    ("chain.commit", 1, "after"),  # published on chain, the validator state not yet saved
]


def _child(world: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, str(CHILD), str(world), *extra],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Cycle 0 up to the last reveal block: two honest miners committed and revealed."""
    root = tmp_path_factory.mktemp("kill9-world")
    config = domain_config()
    subnet = build_subnet(root, config, miners=2, validators=1)
    first_evaluate, _ = phase_bounds(0, "evaluate", config.cycle)
    subnet.run_until(first_evaluate - 1)  # every node ticked through the reveal phase
    return root


def _copy(world: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("kill9-case") / "world"
    shutil.copytree(world, target)
    return target


def _outcome(world: Path) -> dict:
    """What an uninterrupted run must end with, in comparable form."""
    state = ValidatorState.model_validate_json((world / "nodes" / "v0" / "validator_state.json").read_bytes())
    result = state.results[0]
    chain = LocalChain.open(world / "chain.sqlite")
    v0 = chain.metagraph()[0].hotkey
    publications = [
        decode_commitment(c.data)
        for c in chain.commitment_history(v0)
        if isinstance(decode_commitment(c.data), GlobalPayload)
    ]
    return {
        "scores": [(r.hotkey, r.accepted, r.reason, r.domain_loss, r.utility) for r in result.scores],
        "decision": result.decision,
        "merged": result.merged,
        "result_revision": result.result_revision,
        "ema": state.ema,
        "global_cycle": state.global_cycle,
        # the store revision of a re-uploaded folder may differ (manifest time); what it holds may not
        "publications": [(p.cycle, p.record_digest) for p in publications],
        "weights": chain.weights().get(0),
    }


def _assert_no_half_written_file(world: Path) -> None:
    """The validator's workdir holds no temp file and every file in it and in the store parses.

    The shared store may keep a ``.tmp-*`` staging folder of a killed upload: readers never look
    inside one (a revision exists only once renamed), so only the published files are parsed.
    """
    workdir = world / "nodes" / "v0"
    leftovers = [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    assert leftovers == [], leftovers
    for root in (workdir, world / "hub"):
        published = [p for p in root.rglob("*") if not any(part.startswith(".tmp-") for part in p.parts)]
        for path in published:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                load_file(str(path))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> tuple[dict, dict[str, int]]:
    """A clean run's outcome and how often each hook fired in it."""
    clean = _copy(world, tmp_path_factory)
    counts_file = clean.parent / "counts.json"
    run = _child(clean, "--count", str(counts_file))
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = _outcome(clean)
    assert outcome["decision"] in ("merged", "best_single"), outcome
    assert len(outcome["publications"]) == 1 and outcome["weights"]
    return outcome, json.loads(counts_file.read_text())


def _kill_and_restart(world: Path, tmp_path_factory, reference, point: tuple[str, int, str]) -> None:
    expected, _ = reference
    case = _copy(world, tmp_path_factory)
    hook, n, when = point
    killed = _child(case, "--kill", f"{hook}:{n}:{when}")
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    restarted = _child(case)
    assert restarted.returncode == 0, (point, restarted.stderr[-3000:])
    assert _outcome(case) == expected, point
    _assert_no_half_written_file(case)


def test_every_stage_kill_point_fires_in_a_clean_run(reference):
    _, counts = reference
    for hook, n, _ in STAGE_KILL_POINTS:
        assert counts.get(hook, 0) >= n, (hook, counts)


@pytest.mark.parametrize("point", STAGE_KILL_POINTS, ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}")
def test_kill9_at_each_stage_then_restart_ends_like_a_clean_run(world, reference, tmp_path_factory, point):
    _kill_and_restart(world, tmp_path_factory, reference, point)


@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a shrink would rerun processes for minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_kill9_at_any_hook_call_then_restart_ends_like_a_clean_run(world, reference, tmp_path_factory, data):
    """Any call of any hook (every atomic rename included), killed before or after it runs."""
    _, counts = reference
    hook = data.draw(st.sampled_from(sorted(h for h, c in counts.items() if c > 0)))
    n = data.draw(st.integers(1, counts[hook]))
    when = data.draw(st.sampled_from(["before", "after"]))
    _kill_and_restart(world, tmp_path_factory, reference, (hook, n, when))
