"""How much memory and time does sparse expert training save over full fine-tuning?

One Qwen3-MoE (experts dominate its parameters) is saved to a folder, 12.5% of its experts are
selected, and three modes train it side by side, each in its own subprocess so peaks never mix:

- ``full_finetune``: every parameter trainable, AdamW on all of them (in the model dtype, which is
  the cheapest full fine-tune: a conservative baseline);
- ``sparse_full``: ``SparseTrainer`` in full residency (whole model resident and frozen);
- ``sparse_subset``: ``SparseTrainer`` on ``load_subset_model`` (unselected experts never resident).

Regimes: micro-batch 2 with gradient checkpointing (the miner regime), then ``activation_heavy``
(a larger micro-batch, no checkpointing). Reports peak memory above the pre-build baseline (CUDA:
``max_memory_allocated``; CPU: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
median tokens/s over timed steps after warm-up, trainable parameters, optimizer-state bytes and
payload bytes. Human-readable lines first, then the JSON object as the last stdout line.

    python benchmarks/sparse_training.py --out sparse_training.json [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

MODES: tuple[str, ...] = ("full_finetune", "sparse_full", "sparse_subset")
TARGET_SUBSET_MEM_RATIO = 0.35  # sparse_subset peak <= this x full_finetune peak
TARGET_SPEEDUP = 1.3  # sparse tokens/s >= this x full_finetune tokens/s
REPO = Path(__file__).resolve().parents[1]


def _model_config(args: argparse.Namespace) -> dict:
    return dict(
        model_type="qwen3_moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=2,
        moe_intermediate_size=args.moe_intermediate,
        intermediate_size=2 * args.moe_intermediate,
        norm_topk_prob=True,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
    )


def _selection(args: argparse.Namespace) -> dict[int, list[int]]:
    """A seeded ``selected_fraction`` of each layer's experts."""
    import torch

    per_layer = max(1, round(args.experts * args.selected_fraction))
    generator = torch.Generator().manual_seed(args.seed)
    return {
        layer: sorted(torch.randperm(args.experts, generator=generator)[:per_layer].tolist())
        for layer in range(args.layers)
    }


# -- one mode, in a child process ------------------------------------------------------------


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _FullFinetune:
    """The baseline: AdamW over every parameter, same loss, clipping and autocast as SparseTrainer."""

    def __init__(self, model, cfg, device) -> None:  # noqa: ANN001
        import torch

        self.model, self.cfg, self.device = model, cfg, device
        model.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.trainable_params = sum(p.numel() for p in model.parameters())

    def step(self, input_ids) -> float:  # noqa: ANN001
        import torch
        import torch.nn.functional as F

        self.model.train()
        with torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @property
    def optimizer_state_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size()
            for s in self.optimizer.state.values()
            for v in s.values()
            if hasattr(v, "numel")
        )


def _build(mode: str, args: argparse.Namespace, selection: dict[int, list[int]], cfg, device, dtype):  # noqa: ANN001, ANN202
    """The trainer of one mode and a callable that returns its payload (selected experts).

    The full modes build the model from its config with the seed that made the saved folder (the
    same weights): ``from_pretrained`` would also keep the file mapped, and those clean pages
    would inflate the baseline's resident memory. Only ``sparse_subset`` reads the folder.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from connito.ml.moe import read_experts
    from connito.ml.subset_loading import load_subset_model
    from connito.ml.training import SparseTrainer

    if mode == "sparse_subset":
        subset = load_subset_model(Path(args.model_dir), None, selection, dtype=dtype, device=device)
        trainer = SparseTrainer(subset, None, cfg, device=device)
        return trainer, trainer.finish
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**_model_config(args)), dtype=dtype).to(
        device
    )
    if mode == "sparse_full":
        trainer = SparseTrainer(model, selection, cfg, device=device)
        return trainer, trainer.finish
    return _FullFinetune(model, cfg, device), lambda: read_experts(model, selection)


def _run_child(args: argparse.Namespace) -> dict:
    """Train one mode for warm-up + timed steps and measure it."""
    import torch

    # Import everything the mode will use before the baseline: libraries are not the model.
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    import connito.ml.subset_loading  # noqa: F401
    import connito.ml.training  # noqa: F401
    from connito.config import TrainingConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    selection = {int(k): v for k, v in json.loads(args.selection).items()}
    cfg = TrainingConfig(
        lr=1e-4, weight_decay=0.1, batch_size=args.micro_batch, grad_clip=1.0,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    can_reset = True
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        can_reset = _reset_peak_rss()
        base = _proc_kib("VmRSS") * 1024
    trainer, finish = _build(args.child, args, selection, cfg, device, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    step_s = []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_s.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_kib("VmHWM") * 1024 - base
    optimizer_state_bytes = trainer.optimizer_state_bytes
    payload = finish()
    tokens_per_step = args.micro_batch * args.seq_len
    return {
        "peak_mem_bytes": int(peak),
        "tokens_per_s": tokens_per_step / statistics.median(step_s),
        "median_step_s": statistics.median(step_s),
        "trainable_params": int(trainer.trainable_params),
        "optimizer_state_bytes": int(optimizer_state_bytes),
        "payload_bytes": int(sum(t.numel() * t.element_size() for t in payload.values())),
        "payload_keys": len(payload),
        "peak_reset": can_reset,
    }


# -- the parent: build, run every mode, report -----------------------------------------------


def _git_sha() -> str | None:
    """HEAD's commit read from .git (no git process)."""
    head = REPO / ".git" / "HEAD"
    if not head.exists():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref: "):
        return ref
    name = ref[5:]
    ref_file = REPO / ".git" / name
    if ref_file.exists():
        return ref_file.read_text().strip()
    packed = REPO / ".git" / "packed-refs"
    for line in packed.read_text().splitlines() if packed.exists() else []:
        if line.endswith(" " + name):
            return line.split()[0]
    return None


def _versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    import connito

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "connito": connito.__version__,
    }


def _save_model(args: argparse.Namespace, folder: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**_model_config(args)))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _spawn(
    args: argparse.Namespace,
    mode: str,
    model_dir: Path,
    selection: dict,
    *,
    micro_batch: int,
    checkpointing: bool,
) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model-dir", str(model_dir),
        "--selection", json.dumps(selection), "--device", args.device, "--micro-batch", str(micro_batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
        "--vocab", str(args.vocab), "--seed", str(args.seed), "--threads", str(args.threads),
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--experts", str(args.experts),
        "--moe-intermediate", str(args.moe_intermediate),
    ]  # fmt: skip
    if checkpointing:
        command.append("--gradient-checkpointing")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratios(results: dict) -> dict[str, float]:
    full = results["full_finetune"]
    out = {}
    for mode in ("sparse_full", "sparse_subset"):
        out[f"{mode}_peak_mem_vs_full_finetune"] = results[mode]["peak_mem_bytes"] / full["peak_mem_bytes"]
        out[f"{mode}_tokens_per_s_vs_full_finetune"] = results[mode]["tokens_per_s"] / full["tokens_per_s"]
    return out


def _run_regime(args, model_dir: Path, selection: dict, *, micro_batch: int, checkpointing: bool) -> dict:  # noqa: ANN001
    results: dict = {
        "regime": {
            "micro_batch": micro_batch,
            "seq_len": args.seq_len,
            "gradient_checkpointing": checkpointing,
        }
    }
    for mode in MODES:
        results[mode] = _spawn(
            args, mode, model_dir, selection, micro_batch=micro_batch, checkpointing=checkpointing
        )
        r = results[mode]
        print(
            f"{mode:14s} mb={micro_batch} ckpt={checkpointing!s:5s} peak={r['peak_mem_bytes'] / 2**20:8.1f} MiB "
            f"tok/s={r['tokens_per_s']:9.1f} trainable={r['trainable_params']:>10,d} "
            f"optim={r['optimizer_state_bytes'] / 2**20:7.1f} MiB payload={r['payload_bytes'] / 2**20:6.1f} MiB",
            flush=True,
        )
    results["ratios"] = _ratios(results)
    return results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON result here too (default: stdout only)")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu or cuda (default auto)"
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, all MoE (default 4)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per layer (default 16)")
    parser.add_argument(
        "--moe-intermediate", type=int, default=512, help="expert intermediate size (default 512)"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument(
        "--micro-batch", type=int, default=2, help="sequences per step, checkpointed regime (default 2)"
    )
    parser.add_argument(
        "--heavy-micro-batch", type=int, default=4, help="sequences per step, activation_heavy (default 4)"
    )
    parser.add_argument(
        "--selected-fraction", type=float, default=0.125, help="share of experts per layer (default 0.125)"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per mode (default 2)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights, selection and data (default 0)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine more threads spin and time noise; 0 keeps torch's default)",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--selection", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_run_child(args)))
        return 0
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    bench_config = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "child", "model_dir", "selection", "gradient_checkpointing")
    }
    selection = _selection(args)
    with tempfile.TemporaryDirectory(prefix="connito-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        total_params = _save_model(args, model_dir)
        payload_bytes_per_param = 2 if args.device == "cuda" else 4
        selected = sum(len(v) for v in selection.values())
        selected_expert_bytes = selected * 3 * args.hidden * args.moe_intermediate * payload_bytes_per_param
        print(
            f"device={device_name} params={total_params:,d} selected_experts={selected} of {args.layers * args.experts}"
        )
        main_run = _run_regime(args, model_dir, selection, micro_batch=args.micro_batch, checkpointing=True)
        heavy = _run_regime(
            args, model_dir, selection, micro_batch=args.heavy_micro_batch, checkpointing=False
        )
    ratios = main_run["ratios"]
    targets = {
        "sparse_subset_peak_mem_le_0.35x_full_finetune": ratios["sparse_subset_peak_mem_vs_full_finetune"]
        <= TARGET_SUBSET_MEM_RATIO,
        "sparse_full_tokens_per_s_ge_1.3x_full_finetune": ratios["sparse_full_tokens_per_s_vs_full_finetune"]
        >= TARGET_SPEEDUP,
        "sparse_subset_tokens_per_s_ge_1.3x_full_finetune": ratios[
            "sparse_subset_tokens_per_s_vs_full_finetune"
        ]
        >= TARGET_SPEEDUP,
        "payload_bytes_eq_selected_expert_bytes": all(
            main_run[m]["payload_bytes"] == selected_expert_bytes for m in ("sparse_full", "sparse_subset")
        ),
    }
    result = {
        "benchmark": "sparse_training",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": _versions(),
        "git_sha": _git_sha(),
        "config": bench_config,
        "config_digest": hashlib.sha256(json.dumps(bench_config, sort_keys=True).encode()).hexdigest(),
        "model": {**_model_config(args), "total_params": total_params},
        "selection": {str(k): v for k, v in selection.items()},
        "selected_expert_fraction": selected / (args.layers * args.experts),
        "selected_expert_bytes": selected_expert_bytes,
        **main_run,
        "activation_heavy": heavy,
        "targets": targets,
    }
    for name, value in {**ratios, **{f"heavy_{k}": v for k, v in heavy["ratios"].items()}}.items():
        print(f"{name:55s} {value:6.3f}")
    for name, ok in targets.items():
        print(f"target {name:55s} {'PASS' if ok else 'FAIL'}")
    line = json.dumps(result, sort_keys=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
