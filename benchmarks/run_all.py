"""Run every benchmark and write one report: each row a ratio measured side by side in one run.

Every ``benchmarks/*.py`` that is not ``_``-prefixed (and not this file) runs as its own
subprocess with ``--out DIR/<name>.json`` (plus ``--smoke`` and ``--device`` when given and the
script has the flag), its output in ``DIR/<name>.log``. Then:

- ``DIR/results.json``: every result, with each run's status, exit code and wall time;
- ``DIR/benchmarks.md``: a markdown table of the ratios the results carry (candidate / baseline,
  both measured in the same run, e.g. subset / full-fine-tune peak memory, swap / evaluation time,
  distributed / central domain-loss reduction), each with the machine it ran on (the result's
  ``device``), the targets each benchmark set itself, and a table of the runs.

A benchmark that fails is reported and the others still run; the exit code is then 1.
``--from-results FOLDER`` skips running and builds the tables from saved result JSONs (how
``docs/benchmarks.md`` gets the table of ``benchmarks/results/``; ``--doc FILE`` rewrites the
generated block in FILE).

    python benchmarks/run_all.py --out runs/bench [--smoke] [--device auto|cpu|cuda]
    python benchmarks/run_all.py --from-results benchmarks/results --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA_VERSION = 1
DOC_BLOCK = "benchmark-ratios"
BEGIN = f"<!-- BEGIN GENERATED: {DOC_BLOCK} (benchmarks/run_all.py --from-results; do not edit by hand) -->"
END = f"<!-- END GENERATED: {DOC_BLOCK} -->"

# A key names a side-by-side ratio when it says so; inputs and raw samples are not walked.
_RATIO_KEY = re.compile(r"(^|_)ratio(s|_|$)|_vs_|_over_|_fraction$")
_NOT_RATIOS = {"selected_expert_fraction", "selected_fraction", "heldout_fraction"}
_SKIP_SUBTREES = {"config", "setup", "model", "regime", "targets", "samples_s", "versions", "selection"}
MEANINGS: dict[str, str] = {
    "payload_ratio": "bytes uploaded: int8 delta payload / fp payload, experts in the model's dtype",
    "payload_ratio_vs_bf16": "bytes uploaded: int8 delta payload / the same experts as a bf16 fp payload",
    "utility_ratio": "Proof-of-Loss utility (global - submission loss): int8 payload / fp payload, all miners",
    "utility_ratio_min": "Proof-of-Loss utility: int8 payload / fp payload, the worst miner",
    "write_int8_over_fp": "time to write a payload: int8 (encoding the delta) / fp",
    "load_int8_over_fp": "time to verify and load a payload: int8 (decoding against the global) / fp",
    "sparse_subset_peak_mem_vs_full_finetune": "peak memory: sparse training in subset residency / full fine-tune",
    "sparse_full_peak_mem_vs_full_finetune": "peak memory: sparse training in full residency / full fine-tune",
    "sparse_subset_tokens_per_s_vs_full_finetune": "tokens/s: sparse training in subset residency / full fine-tune",
    "sparse_full_tokens_per_s_vs_full_finetune": "tokens/s: sparse training in full residency / full fine-tune",
    "swap_fraction": "time to swap one submission's experts in and out / time to evaluate it",
    "reload_over_swap": "time to reload the model / time to swap experts (what swapping saves)",
    "reload_over_eval": "time to reload the model / time to evaluate one submission",
    "domain_loss_reduction_ratio": "domain-loss drop: N miners + outer step / synchronous data parallel, same tokens",
    "domain_loss_reduction_ratio_vs_sequential": "domain-loss drop: N miners + outer step / one sequential trainer, same tokens",
    "growth_vs_payload": "validator RSS growth per added submission / one submission's payload bytes",
}
_PREFIX_MEANINGS = {"activation_heavy": "activation-heavy regime (bigger micro-batch, no checkpointing)"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Ratio:
    """One ratio a result carries: where it sits in the JSON, its value, what it compares."""

    label: str  # which result (benchmark name or result file stem)
    key: str  # dotted path inside the result
    value: float | None  # None: the benchmark reported no ratio (its baseline did not move)
    meaning: str
    device: str


# Tables --------------------------------------------------------------------------------------------


def _walk(result: Mapping[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in _SKIP_SUBTREES and depth < 2:
            yield from _walk(value, path + ".", depth + 1)
        elif _RATIO_KEY.search(key) and key not in _NOT_RATIOS:
            if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
                yield path, value


def _meaning(path: str) -> str:
    parts = path.split(".")
    leaf = MEANINGS.get(parts[-1], parts[-1].replace("_", " "))
    context = [_PREFIX_MEANINGS[p] for p in parts[:-1] if p in _PREFIX_MEANINGS]
    return f"{leaf}; {', '.join(context)}" if context else leaf


def ratios(label: str, result: Mapping[str, Any]) -> list[Ratio]:
    """Every side-by-side ratio in one benchmark result, in the result's own key order."""
    device = str(result.get("device", "unknown"))
    return [
        Ratio(label=label, key=path, value=value, meaning=_meaning(path), device=device)
        for path, value in _walk(result)
    ]


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def ratio_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table of every ratio in ``results`` (label -> result), one row per ratio."""
    lines = ["| benchmark | ratio | value | what it compares | machine |", "| --- | --- | --- | --- | --- |"]
    for label, result in results.items():
        for row in ratios(label, result):
            cells = (f"`{row.label}`", f"`{row.key}`", _fmt(row.value), row.meaning, row.device)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def targets_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The targets each benchmark set itself (``result["targets"]``) and whether this run met them."""
    lines = ["| benchmark | target | met |", "| --- | --- | --- |"]
    for label, result in results.items():
        for name, met in (result.get("targets") or {}).items():
            lines.append(f"| `{_cell(label)}` | `{_cell(name)}` | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def results_block(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Ratios then targets: the block ``docs/benchmarks.md`` carries."""
    dates = sorted({str(r.get("date", ""))[:10] for r in results.values() if r.get("date")})
    smoke = sorted(label for label, r in results.items() if r.get("smoke"))
    note = f"Results dated {', '.join(dates) or 'unknown'}."
    if smoke:
        note += f" `--smoke` runs (wiring checks, not measurements): {', '.join(smoke)}."
    return (
        f"{note}\n\n{ratio_table(results)}\nTargets each benchmark sets itself:\n\n{targets_table(results)}"
    )


def replace_block(text: str, block: str, *, where: str) -> str:
    """``text`` with the generated block between the markers replaced.

    Raises:
        ValueError: the markers are missing or repeated.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: needs one {BEGIN!r} line followed by one {END!r} line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{block.rstrip()}\n\n{END}{tail}"


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Saved result JSONs of a folder, by file stem (one JSON object per file, the last line)."""
    loaded = {}
    for path in sorted(folder.glob("*.json")):
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        result = json.loads(lines[-1]) if lines else None
        if isinstance(result, dict) and "benchmark" in result:
            loaded[path.stem] = result
    return loaded


# Running -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """What happened to one benchmark script."""

    name: str
    status: str  # ok | failed | skipped
    returncode: int | None
    wall_s: float
    command: list[str]
    detail: str = ""
    result: dict[str, Any] | None = None


def discover(folder: Path) -> list[Path]:
    """Every benchmark script in ``folder``: ``*.py`` not ``_``-prefixed, except this runner."""
    return sorted(
        p for p in folder.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name
    )


def _flags_of(script: Path) -> str:
    """The script's ``--help`` text: which of ``--smoke`` / ``--device`` it takes."""
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    return done.stdout if done.returncode == 0 else ""


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def run_one(script: Path, out_dir: Path, *, smoke: bool, device: str | None, timeout_s: float | None) -> Run:
    """Run one benchmark as a subprocess; its stdout and stderr go to ``out_dir/<name>.log``."""
    name = script.stem
    help_text = _flags_of(script)
    out_json, log = out_dir / f"{name}.json", out_dir / f"{name}.log"
    command = [sys.executable, str(script), "--out", str(out_json)]
    if smoke:
        if "--smoke" not in help_text:
            return Run(
                name=name,
                status="skipped",
                returncode=None,
                wall_s=0.0,
                command=command,
                detail="no --smoke flag",
            )
        command.append("--smoke")
    if device is not None and "--device" in help_text:
        command += ["--device", device]
    print(f"run {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    try:
        with log.open("w", encoding="utf-8") as sink:
            done = subprocess.run(
                command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout_s, text=True
            )
        returncode, detail = done.returncode, ""
    except subprocess.TimeoutExpired:
        returncode, detail = None, f"timed out after {timeout_s} s"
    wall_s = time.perf_counter() - started
    result = _read_result(out_json, log)
    if returncode == 0 and result is None:
        detail = "exited 0 but wrote no JSON result"
    ok = returncode == 0 and result is not None
    if not ok and not detail:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        detail = tail[-1][:200] if tail else f"exit {returncode}"
    status = "ok" if ok else "failed"
    print(f"{status} {name} in {wall_s:.1f} s{': ' + detail if detail else ''}", flush=True)
    return Run(
        name=name,
        status=status,
        returncode=returncode,
        wall_s=wall_s,
        command=command,
        detail=detail,
        result=result,
    )


def _read_result(out_json: Path, log: Path) -> dict[str, Any] | None:
    if out_json.exists():
        return _last_json(out_json.read_text(encoding="utf-8"))
    return _last_json(log.read_text(encoding="utf-8", errors="replace")) if log.exists() else None


def _git_sha() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return done.stdout.strip() or None


def runs_table(runs: list[Run]) -> str:
    lines = ["| benchmark | status | wall s | detail |", "| --- | --- | --- | --- |"]
    for run in runs:
        lines.append(f"| `{run.name}` | {run.status} | {run.wall_s:.1f} | {_cell(run.detail)} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, runs: list[Run], *, smoke: bool, device: str | None) -> None:
    """``results.json`` (everything) and ``benchmarks.md`` (the tables) in ``out_dir``."""
    date = datetime.now(UTC).isoformat(timespec="seconds")
    record = {
        "schema_version": SCHEMA_VERSION,
        "date": date,
        "git_sha": _git_sha(),
        "smoke": smoke,
        "device_flag": device,
        "benchmarks": {
            run.name: {
                "status": run.status,
                "returncode": run.returncode,
                "wall_s": run.wall_s,
                "command": run.command[1:],
                "detail": run.detail,
                "result": run.result,
            }
            for run in runs
        },
    }
    (out_dir / "results.json").write_text(
        json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    results = {run.name: run.result for run in runs if run.result is not None}
    title = "# Benchmark report" + (" (`--smoke`: wiring check, not measurements)" if smoke else "")
    body = f"{title}\n\nRun {date} at git `{(record['git_sha'] or 'unknown')[:12]}`.\n\n"
    body += f"{results_block(results)}\nRuns:\n\n{runs_table(runs)}"
    (out_dir / "benchmarks.md").write_text(body, encoding="utf-8")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="report folder: results.json, benchmarks.md, one .json and .log per run"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="pass --smoke to each benchmark (seconds, wiring only)"
    )
    parser.add_argument(
        "--device", default=None, help="pass --device to each benchmark that takes it (default: theirs)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated benchmark names to run (default: every one)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=None, help="per-benchmark wall-clock limit (default none)"
    )
    parser.add_argument(
        "--benchmarks-dir", type=Path, default=HERE, help="folder of benchmark scripts (default: this folder)"
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="run nothing: tables from saved result JSONs",
    )
    parser.add_argument(
        "--doc", type=Path, default=None, help="with --from-results: rewrite the generated block in this file"
    )
    args = parser.parse_args(argv)
    if args.from_results is None and args.out is None:
        parser.error("--out is required unless --from-results is given")
    if args.doc is not None and args.from_results is None:
        parser.error("--doc needs --from-results")
    return args


def _from_results(args: argparse.Namespace) -> int:
    results = load_results(args.from_results)
    if not results:
        print(f"run_all: no benchmark result JSON in {args.from_results}", file=sys.stderr)
        return 1
    block = results_block(results)
    if args.doc is not None:
        try:
            text = replace_block(args.doc.read_text(encoding="utf-8"), block, where=str(args.doc))
        except (OSError, ValueError) as exc:
            print(f"run_all: {exc}", file=sys.stderr)
            return 1
        args.doc.write_text(text, encoding="utf-8")
        print(f"updated {args.doc}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmarks.md").write_text(f"# Benchmark results\n\n{block}", encoding="utf-8")
    if args.doc is None and args.out is None:
        print(block, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.from_results is not None:
        return _from_results(args)
    scripts = discover(args.benchmarks_dir)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            print(f"run_all: --only: unknown benchmarks {sorted(unknown)}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.stem in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [
        run_one(s, args.out, smoke=args.smoke, device=args.device, timeout_s=args.timeout_s) for s in scripts
    ]
    write_report(args.out, runs, smoke=args.smoke, device=args.device)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'benchmarks.md'}")
    return 0 if all(run.status != "failed" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
