"""Bounded disks: miners, validators and the local store keep the files of the last K cycles.

The oracle for the whole is a run of many short cycles: after K cycles the nodes' workdirs and
the store stop growing. The parts: which folders a prune deletes (never the held global, never
a name that is not a cycle) and which revisions a local store keeps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from e2e_harness import build_subnet, domain_config

from connito.errors import StoreError
from connito.hub import LocalStore
from connito.node.disk_retention import prune_cycle_folders, workdir_bytes
from connito.node.miner import Miner
from connito.node.validator import Validator


def test_prune_keeps_the_last_k_cycles_the_held_global_and_other_names(tmp_path: Path) -> None:
    for name in ("1", "2", "3", "4", "5", "notes", "5.json", "2.json", "global-1"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("{}")
    deleted = prune_cycle_folders(tmp_path, current_cycle=5, keep_cycles=2, protect=frozenset({2}))
    assert sorted(deleted) == ["1", "3", "global-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "2.json", "4", "5", "5.json", "notes"]


def test_local_store_keeps_the_newest_revisions_of_one_repo(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "hub")
    refs = []
    for i in range(4):
        folder = tmp_path / f"ckpt{i}"
        folder.mkdir()
        (folder / "manifest.json").write_text(f'{{"i": {i}}}')
        (folder / "experts.safetensors").write_bytes(bytes([i]) * 8)
        refs.append(store.upload(folder, repo="m/x"))
        revision_dir = tmp_path / "hub" / "m" / "x" / refs[-1].revision
        os.utime(revision_dir, ns=(i * 10**9, i * 10**9))  # upload order, independent of clock resolution
    assert store.prune_revisions("m/x", keep_newest=2) == 2
    kept = sorted(p.name for p in (tmp_path / "hub" / "m" / "x").iterdir())
    assert kept == sorted(r.revision for r in refs[2:])
    with pytest.raises(StoreError, match="keep_newest must be >= 1"):
        store.prune_revisions("m/x", keep_newest=0)


@pytest.mark.slow
def test_disk_use_stops_growing_after_k_cycles(tmp_path: Path) -> None:
    """Ten short cycles with keep_cycles=2: from cycle 4 on, nodes and store stay within the
    largest size seen at cycles 2-3 (one payload's jitter), instead of growing by a cycle's files.

    Measured (2 miners, 2 validators): 1.35, 2.69, 3.26, 2.64, 2.79, 3.26, 3.26, 3.26, 3.25,
    3.25 MB after cycles 0-9."""
    keep, cycles = 2, 10
    config = domain_config()
    subnet = build_subnet(tmp_path, config, miners=2, validators=2)
    for name, node in list(subnet.nodes.items()):
        ctx = dataclasses.replace(node.ctx, keep_cycles=keep)  # type: ignore[attr-defined]
        subnet.nodes[name] = (
            Validator(ctx) if isinstance(node, Validator) else Miner(ctx, progress_bars=False)
        )
    sizes = []
    for cycle in range(cycles):
        subnet.run_until((cycle + 1) * config.cycle.cycle_blocks - 1)
        sizes.append(workdir_bytes(tmp_path / "nodes") + workdir_bytes(tmp_path / "hub"))
        print(f"disk cycle={cycle} bytes={sizes[-1]}")  # noqa: T201 - the measurement, shown with -s
    plateau = max(sizes[keep : keep + 2])
    assert all(size <= plateau * 1.1 for size in sizes[keep + 2 :]), sizes
    assert sizes[-1] < sizes[keep] * (cycles - keep) / 2, sizes  # unpruned, it grows linearly
    assert len(list((tmp_path / "nodes" / "m0" / "checkpoints").iterdir())) <= keep
    assert len(list((tmp_path / "hub" / "nodes" / "m0").iterdir())) <= keep + 1  # pruned, then this cycle's
