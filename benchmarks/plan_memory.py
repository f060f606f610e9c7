"""Is ``connito plan``'s memory estimate right? Peak memory of a real training step vs the estimate.

For each shipped real config (``configs/domains/math-*.yaml`` with a ``configs/models`` copy of its
model's ``config.json``), the model is cut to its first one or two decoder layers (two where layer
0 is dense, so one MoE layer is kept) at its real dimensions, built on the CPU in the config's
dtype with every weight touched, and trained for one optimizer step by ``SparseTrainer`` (full
residency, the first ``max_experts_per_layer`` experts of each MoE layer, micro-batch
``--batch-size`` x ``--seq-len`` tokens, no gradient checkpointing, the default experts kernel),
twice: the second step is the steady state the plan estimates. Each model runs in a fresh
child process; its peak resident memory (``VmHWM``) minus its resident memory before the model was
built is compared with ``connito.ml.memory_plan.estimate_memory`` for the same cut model:

    ratio = measured / estimated     (the plan is within 10% when 0.9 <= ratio <= 1.1)

    python benchmarks/plan_memory.py --out plan_memory.json [--seq-len 128] [--only qwen3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from _common import REPO, add_common_flags, emit, metadata, setup

from connito.config import load_domain_config

DOMAINS = REPO / "configs" / "domains"
MiB = 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cut_config(config_path: Path) -> tuple[Any, Any]:
    """The domain config and its model's transformers config cut to one MoE layer (two if layer 0 is dense)."""
    from connito.ml.model_config import read_model_config

    domain = load_domain_config(config_path)
    hf_config = read_model_config(domain.model, config_path=config_path)
    layers = 1 + int(getattr(hf_config, "first_k_dense_replace", 0) or 0)
    hf_config.num_hidden_layers = layers
    if getattr(hf_config, "layer_types", None) is not None:
        hf_config.layer_types = list(hf_config.layer_types)[:layers]
    return domain, hf_config


def child(config_path: Path, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Build, train one step, and report measured and estimated peak bytes (runs in a fresh process)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from connito.ml.memory_plan import estimate_memory, meta_model, model_shape
    from connito.ml.modeling import TORCH_DTYPES
    from connito.ml.moe import moe_layers
    from connito.ml.training import SparseTrainer

    domain, hf_config = _cut_config(config_path)
    dtype = TORCH_DTYPES[domain.model.dtype]
    shape = model_shape(meta_model(hf_config, dtype))
    torch.manual_seed(0)
    baseline_kib = _rss_kib("VmRSS")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with torch.no_grad():  # touch every page: untouched torch.empty memory is not resident
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    cap = domain.selection.max_experts_per_layer or 1
    selection = {layer.index: list(range(min(cap, layer.num_experts))) for layer in moe_layers(model)}
    training = domain.training.model_copy(
        update={"batch_size": batch_size, "grad_accum_steps": 1, "gradient_checkpointing": False}
    )
    trainer = SparseTrainer(model, selection, training)
    batch = torch.randint(0, int(hf_config.vocab_size), (batch_size, seq_len))
    for _ in range(2):  # the second step is the steady state: AdamW's moments exist during backward
        trainer.step(batch)
    measured = (_rss_kib("VmHWM") - baseline_kib) * 1024
    estimate = estimate_memory(
        shape,
        {layer: len(ids) for layer, ids in selection.items()},
        residency="full",
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        micro_batch=batch_size,
        sequence_length=seq_len,
    )
    return {
        "config": config_path.name,
        "model": domain.model.name,
        "layers": int(hf_config.num_hidden_layers),
        "selected_experts": sum(len(ids) for ids in selection.values()),
        "measured_bytes": measured,
        "estimated_bytes": estimate.total,
        "estimate_terms": {
            "weights": estimate.weights,
            "trainable": estimate.trainable,
            "fused_gradient": estimate.fused_gradient,
            "activations": estimate.activations,
        },
        "ratio": measured / estimate.total,
    }


def _real_configs(only: str | None, *, smoke: bool = False) -> list[Path]:
    """The shipped real configs (``--smoke``: tiny-math's inline model, a wiring check in seconds)."""
    from connito.ml.model_config import config_copy_path

    if smoke:
        return [DOMAINS / "tiny-math.yaml"]
    paths = []
    for path in sorted(DOMAINS.glob("math-*.yaml")):
        model_id = load_domain_config(path).model.id
        if (
            model_id is not None
            and config_copy_path(path, model_id).exists()
            and (only is None or only in path.name)
        ):
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument(
        "--only", default=None, help="run configs whose file name contains this (default all)"
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        torch.set_num_threads(args.threads or 1)
        print(json.dumps(child(args.child, args.batch_size, args.seq_len)))
        return 0
    device = setup(args)
    rows = []
    configs = _real_configs(args.only, smoke=args.smoke)
    for path in configs:
        command = [sys.executable, __file__, "--child", str(path), "--batch-size", str(args.batch_size)]
        command += ["--seq-len", str(args.seq_len), "--threads", str(args.threads or 1)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{path.name}: child failed: {done.stderr.strip().splitlines()[-1:]}")
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['model']:<32} layers={row['layers']} measured {row['measured_bytes'] / MiB:9.1f} MiB  "
            f"estimated {row['estimated_bytes'] / MiB:9.1f} MiB  ratio {row['ratio']:.3f}",
            flush=True,
        )
    if not rows:
        print("no real config with a configs/models copy matched --only")
        return 1
    result = metadata("plan_memory", args, load_domain_config(configs[0]), device)
    result.update(
        {
            "config_path": ",".join(str(path.relative_to(REPO)) for path in configs),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rows": rows,
            "ratios": {
                row["config"].removesuffix(".yaml") + "_measured_over_estimated": row["ratio"] for row in rows
            },
            "within_10_percent": all(0.9 <= row["ratio"] <= 1.1 for row in rows),
        }
    )
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
