"""Several ranks train one miner's experts as one trainer: ddp and fsdp on CPU with gloo.

Two processes (torch.multiprocessing, the environment ``accelerate launch``/torchrun would set)
train the tiny model for a few steps; both ranks must end with identical experts, equal (to fp
tolerance) to one process training on the same global batch (both ranks' micro-batches as
gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import random_batch, tiny_model
from safetensors.torch import load_file, save_file

from connito.config import TrainingConfig
from connito.errors import ConfigError
from connito.ml.distributed import Distributed, init_distributed
from connito.ml.moe import read_experts
from connito.ml.subset import extract_subset
from connito.ml.training import SparseTrainer

SELECTION = {0: [1, 5], 1: [3]}
CFG = TrainingConfig(lr=1e-2, weight_decay=0.1, batch_size=2, grad_clip=1.0)
WORLD = 2
STEPS = 3
# name -> (strategy, residency, grad_accum_steps per rank, document pool sizes)
RUNS = {
    "ddp-full": ("ddp", "full", 1, None),
    "ddp-subset": ("ddp", "subset", 1, None),
    "fsdp-full": ("fsdp", "full", 2, None),
    "ddp-full-pools": ("ddp", "full", 2, (1, 2)),
}

# fsdp reduce-scatters gradients in another order than one process sums them; AdamW divides by
# sqrt(v), so a last-bit difference in a near-zero gradient moves a weight by up to ~1e-5 over 3
# steps (seen: 5 of 512 elements, 2.1e-5, only when OMP_NUM_THREADS is set), 200x below one step (lr).
ATOL = {name: 5e-5 if strategy == "fsdp" else 2e-6 for name, (strategy, *_rest) in RUNS.items()}


def _batches(count: int) -> list[torch.Tensor]:
    return [random_batch(seed=100 + i) for i in range(count)]


def _model_and_selection(residency: str):
    model = tiny_model("qwen3_moe")
    return (extract_subset(model, SELECTION), None) if residency == "subset" else (model, SELECTION)


def _train(
    residency: str, accum: int, dist: Distributed | None, pools: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    world = dist.world_size if dist is not None else 1
    cfg = CFG.model_copy(update={"grad_accum_steps": accum, "document_pools": pools})
    trainer = SparseTrainer(*_model_and_selection(residency), cfg, dist=dist)
    result = trainer.train(_batches(STEPS * accum * WORLD), STEPS, progress=False)
    assert result.steps == STEPS and trainer.micro_batches_per_step == accum * world
    return {key: tensor.contiguous() for key, tensor in trainer.finish().items()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import torch.distributed as torch_dist

    dist = init_distributed("ddp", device="cpu")
    assert (dist.rank, dist.world_size, dist.device.type) == (rank, WORLD, "cpu")
    for name, (strategy, residency, accum, pools) in RUNS.items():
        experts = _train(residency, accum, dataclasses.replace(dist, strategy=strategy), pools)
        save_file(experts, str(Path(out) / f"{name}.rank{rank}.safetensors"))
    # resume: rank 0 alone holds a trained state; sync_replicas gives it to rank 1
    trainer = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG, dist=dist)
    if dist.is_main:
        donor = SparseTrainer(tiny_model("qwen3_moe"), SELECTION, CFG)
        donor.train(_batches(2), 2, progress=False)
        trainer.load_state_dict(donor.state_dict())
    assert trainer.sync_replicas() == 2
    state = {k: v.contiguous() for k, v in trainer.state_dict().items() if not k.startswith("rng")}
    save_file(state, str(Path(out) / f"resume.rank{rank}.safetensors"))
    torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    # forkserver: the children fork from a server that imported this module once and never ran a
    # tensor op (forking pytest itself can hang the children in OpenMP; spawning imports twice)
    mp.set_forkserver_preload([__name__])
    mp.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="forkserver"
    )
    return out


@pytest.mark.slow  # two processes: ~30 s on a loaded 2-core box, most of it importing torch once
@pytest.mark.parametrize("name", sorted(RUNS))
def test_ranks_agree_and_equal_one_process_on_the_global_batch(rank_outputs, name):
    """Both ranks hold bit-identical experts, equal to one process accumulating both ranks' batches."""
    _, residency, accum, pools = RUNS[name]
    ranks = [load_file(str(rank_outputs / f"{name}.rank{r}.safetensors")) for r in range(WORLD)]
    reference = _train(residency, accum * WORLD, None, pools)
    base = read_experts(tiny_model("qwen3_moe"), SELECTION)
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for key in reference:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], reference[key], rtol=0, atol=ATOL[name])
        assert not torch.equal(reference[key], base[key]), key  # it did train


@pytest.mark.slow
def test_sync_replicas_gives_every_rank_rank0s_resumed_state(rank_outputs):
    """Rank 0 resumed 2 steps, rank 1 nothing: after sync both hold the same masters, AdamW state and step."""
    states = [load_file(str(rank_outputs / f"resume.rank{r}.safetensors")) for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    assert any(key.startswith("optim.exp_avg.") for key in states[0])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[1]["step"]) == 2


def test_one_process_is_single_and_bad_strategy_is_refused():
    """Outside a launcher any strategy runs as one process; an unknown one is a one-line ConfigError."""
    dist = init_distributed("fsdp", device="cpu")
    assert (dist.strategy, dist.world_size, dist.is_main, dist.device) == (
        "single",
        1,
        True,
        torch.device("cpu"),
    )
    with pytest.raises(ConfigError, match="--training.strategy"):
        init_distributed("zero3", device="cpu")


def test_only_rank0_writes_commits_and_reveals(tmp_path):
    """Rank 1 of a group keeps its progress in memory only and sweeps nothing; rank 0 sweeps the
    shared workdir, writes the checkpoint and commits."""
    from e2e_harness import build_subnet, domain_config

    from connito.node.miner import Miner, MinerProgress

    subnet = build_subnet(tmp_path, domain_config(), miners=1, validators=1)
    ctx = subnet.nodes["m0"].ctx
    hotkey = ctx.hotkey
    for rank in (1, 0):
        dist = Distributed(strategy="ddp", rank=rank, world_size=WORLD, device=torch.device("cpu"))
        workdir = tmp_path / f"rank{rank}"
        workdir.mkdir()
        (workdir / ".data.abc123.tmp").write_bytes(b"half-written by another rank")
        miner = Miner(dataclasses.replace(ctx, workdir=workdir), progress_bars=False, dist=dist)
        assert (workdir / ".data.abc123.tmp").exists() == (rank == 1)  # only rank 0 sweeps the workdir
        miner.pull_global(0)  # rank 1 never reads the chain or the store for it
        miner._save_progress(MinerProgress(cycle=0, global_revision=miner.global_state.revision))
        miner.write_submission(0, miner.global_state.experts)
        miner.commit(0)
        written = (tmp_path / f"rank{rank}" / "checkpoints" / "0").exists()
        committed = any(c.hotkey == hotkey for c in subnet.chain.commitments())
        assert miner.progress.checkpoint is not None
        assert (written, committed, miner._progress_path.exists()) == ((rank == 0,) * 3), rank
