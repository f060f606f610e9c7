"""Shared plumbing for connito's benchmarks: device, metadata, median timing, the JSON result.

Every benchmark prints human-readable lines first and one JSON object as the last stdout line
(the same object ``--out`` writes), carrying the device, library versions, git SHA and config
digest, so a published number can always be traced to the code and protocol that produced it.
Timings synchronise the device around each sample and report the median after warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from connito.config import DomainConfig, config_digest, load_domain_config, parse_domain_config
from connito.data import DomainData
from connito.fsutil import atomic_write
from connito.localnet.runner import PRETRAIN
from connito.ml.selection_record import ExpertSelection, load_selection, save_selection
from connito.owner.bootstrap import PRETRAIN_MARKER, build_selection, pretrain_base

__all__ = [
    "REPO",
    "DEFAULT_CONFIG",
    "SMOKE_DOMAIN",
    "Timing",
    "PRETRAIN",
    "add_common_flags",
    "owner_base",
    "owner_selection",
    "pretrain_mixture",
    "setup",
    "resolve_device",
    "device_name",
    "synchronize",
    "versions",
    "git_sha",
    "load_config",
    "metadata",
    "median_time",
    "emit",
    "run_cached",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "domains" / "tiny-math.yaml"

# A seconds-scale domain for ``--smoke``: 2 layers, 8 experts, hidden 32, 32-token sequences.
SMOKE_DOMAIN: dict[str, Any] = {
    "name": "bench-smoke",
    "model": {
        "inline": {
            "model_type": "qwen3_moe",
            "vocab_size": 512,
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
        }
    },
    "data": {
        "train": [{"kind": "generated", "name": "math", "max_documents": 600}],
        "general": [{"kind": "generated", "name": "english", "max_documents": 60}],
        "heldout_fraction": 0.1,
        "sequence_length": 32,
        "tokenizer": {"kind": "local_bpe", "vocab_size": 512},
    },
    "selection": {"p": 0.2, "max_experts_per_layer": 3, "probe_tokens": 2048},
    "training": {"inner_steps": 4, "lr": 0.01, "batch_size": 4, "residency": "subset"},
    "cycle": {
        "train_blocks": 2,
        "commit_blocks": 2,
        "reveal_blocks": 2,
        "evaluate_blocks": 2,
        "merge_blocks": 2,
    },
    "scoring": {"eval_batches": 3, "eval_batch_size": 4, "general_batches": 2, "top_k": 4},
    "merge": {"top_n": 2, "clip_norm": 4.0},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """Median and raw samples of one timed operation, in seconds."""

    median_s: float
    samples_s: tuple[float, ...]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark shares: output, config, device, threads, cache, smoke, logging."""
    parser.add_argument("--out", type=Path, help="write the JSON result here too (default: stdout only)")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"domain YAML (default {DEFAULT_CONFIG.relative_to(REPO)})",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu or cuda (default auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2; 0 keeps torch's default)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="data, tokenizer and model cache (default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a built-in tiny domain and few steps: checks the wiring in seconds",
    )
    parser.add_argument("--verbose", action="store_true", help="show connito's INFO log lines on stderr")


def setup(args: argparse.Namespace) -> torch.device:
    """Configure logging and threads once (entry point only); return the device to run on."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def resolve_device(flag: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock sample covers the work, not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, str]:
    import transformers

    import connito

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "connito": connito.__version__,
    }


def git_sha() -> str | None:
    """HEAD's commit, read from ``.git`` (no git process); None outside a checkout."""
    git = REPO / ".git"
    head = git / "HEAD"
    if not head.exists():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref: "):
        return ref
    name = ref[len("ref: ") :]
    if (git / name).exists():
        return (git / name).read_text().strip()
    packed = git / "packed-refs"
    for line in packed.read_text().splitlines() if packed.exists() else []:
        if line.endswith(" " + name):
            return line.split()[0]
    return None


def load_config(args: argparse.Namespace) -> DomainConfig:
    """The domain config: ``SMOKE_DOMAIN`` under ``--smoke``, else ``--config``."""
    if args.smoke:
        return parse_domain_config(SMOKE_DOMAIN, path="<smoke>")
    return load_domain_config(args.config)


def pretrain_mixture(data: DomainData) -> dict[str, float]:
    """The localnet owner's mixture over the parts this domain has (its own weights if none match)."""
    parts = {part.name for part in data.mixture}
    mixture = {name: weight for name, weight in PRETRAIN["mixture"].items() if name in parts}
    return mixture or {part.name: part.weight for part in data.mixture}


def owner_base(
    config: DomainConfig,
    data: DomainData,
    base_dir: Path,
    *,
    steps: int,
    batch_size: int = PRETRAIN["batch_size"],
) -> tuple[torch.nn.Module, str]:
    """The localnet owner's pretrained base (cached in ``base_dir``, eval mode) and its revision."""
    model = pretrain_base(
        config,
        data,
        base_dir,
        steps=steps,
        batch_size=batch_size,
        lr=PRETRAIN["lr"],
        mixture=pretrain_mixture(data),
        document_pools=PRETRAIN["document_pools"],
        progress=False,
    )
    return model.eval(), str(json.loads((base_dir / PRETRAIN_MARKER).read_text())["revision"])


def owner_selection(
    config: DomainConfig, model: torch.nn.Module, data: DomainData, base_dir: Path, revision: str
) -> ExpertSelection:
    """The owner's selection for this base, reused from ``base_dir`` when the base and config match."""
    path = base_dir / f"selection-{config_digest(config)[:16]}.json"
    if path.exists() and (cached := load_selection(path)).model_revision == revision:
        return cached
    selection = build_selection(config, model, data, model_revision=revision, progress=False).sealed()
    save_selection(selection, path)
    return selection


def metadata(
    benchmark: str, args: argparse.Namespace, config: DomainConfig, device: torch.device
) -> dict[str, Any]:
    """Who, where and with what: the fields every benchmark result starts with."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": versions(),
        "git_sha": git_sha(),
        "config_path": "<smoke>" if args.smoke else str(args.config),
        "config_digest": config_digest(config),
        "domain": config.name,
        "smoke": bool(args.smoke),
    }


def median_time(fn: Callable[[int], object], *, repeats: int, warmup: int, device: torch.device) -> Timing:
    """Run ``fn(i)`` for ``warmup`` untimed then ``repeats`` timed calls; the median of the timed ones.

    ``i`` counts all calls from 0, so a caller can rotate through inputs. The device is
    synchronised before and after each timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: list[float] = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn(index)
        synchronize(device)
        if index >= warmup:
            samples.append(time.perf_counter() - start)
    return Timing(median_s=statistics.median(samples), samples_s=tuple(samples))


def run_cached(
    benchmark: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, DomainConfig, torch.device, Path], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> int:
    """A benchmark's whole ``main`` after parsing: device, config, ``run`` with ``--cache-dir`` (or a
    temporary folder), metadata and total time added, ``report`` printed, the JSON emitted."""
    device = setup(args)
    config = load_config(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"connito-{benchmark}-") as tmp:
        cache_dir = args.cache_dir if args.cache_dir is not None else Path(tmp)
        measured = run(args, config, device, cache_dir)
    result = {**metadata(benchmark, args, config, device), **measured}
    result["timings_s"]["total_s"] = time.perf_counter() - started
    report(result)
    emit(result, args.out)
    return 0


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as the last stdout line and write the same line to ``out``."""
    line = json.dumps(result, sort_keys=True)
    if out is not None:
        atomic_write(out, (line + "\n").encode("utf-8"))
    print(line, flush=True)
