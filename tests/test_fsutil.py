"""Crash-safe writes: a reader never sees half a file, and a restart sweeps what a kill left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from connito.fsutil import atomic_write, atomic_write_json, sweep_temp_files


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "state.json"
    atomic_write_json(target, {"a": 1})
    atomic_write(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_kill9_before_the_rename_keeps_the_old_file_and_sweep_removes_the_temp(tmp_path):
    """A real SIGKILL between the temp write and the rename: the target is the old content."""
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    script = textwrap.dedent(
        f"""
        import os, signal
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from connito.fsutil import atomic_write
        atomic_write({str(target)!r}, b"new" * 1000)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".state.json.")
    assert sweep_temp_files(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_sweep_removes_staging_folders_and_keeps_everything_else(tmp_path):
    keep = [tmp_path / "a.json", tmp_path / "sub" / ".hidden", tmp_path / "sub" / "x.tmp"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"1")
    staging = tmp_path / "sub" / ".tmp-abc"
    (staging / "nested").mkdir(parents=True)
    (staging / "nested" / "experts.safetensors").write_bytes(b"partial")
    temp = tmp_path / "sub" / ".a.json.k2j3.tmp"
    temp.write_bytes(b"half")
    removed = sweep_temp_files(tmp_path)
    assert set(removed) == {staging, temp}
    assert all(path.exists() for path in keep)
    assert sweep_temp_files(tmp_path / "missing") == []
    assert sorted(os.listdir(tmp_path / "sub")) == [".hidden", "x.tmp"]
