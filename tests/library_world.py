"""A small two-domain world for library tests: one base MoE, a math and a code domain sharing its
tokenizer, each trained briefly on its own disjoint experts with the real SparseTrainer and recorded
as library versions. Built once per test module (~15 s).

The base has 16 experts (top-2) and is pretrained briefly on math, English and code, so routing
has begun to specialise; each domain then trains the one expert per layer its tokens prefer most
over the other domain's (the ESFT differential rule), which keeps cross-domain routing traffic low.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from conftest import make_selection
from e2e_harness import TINY_DOMAIN

from connito.config import DomainConfig, TrainingConfig, config_digest, parse_domain_config
from connito.data import DomainData, build_domain_data
from connito.library import Contributor, Library, VersionDraft
from connito.ml.modeling import build_model, heldout_loss, load_model
from connito.ml.moe import read_experts
from connito.ml.selection import probe_routing
from connito.ml.selection_record import ExpertSelection
from connito.ml.training import SparseTrainer
from connito.protocol.merge import state_revision

MODEL_REVISION = "test-base-rev"
EVAL_SEED = 11
NUM_EXPERTS = 16
PRETRAIN_STEPS = 200


@dataclass
class Domain:
    config: DomainConfig
    data: DomainData
    selection: ExpertSelection


@dataclass
class World:
    root: Path
    base_dir: Path
    library: Library
    math: Domain
    code: Domain
    num_experts: int = NUM_EXPERTS

    def base_model(self):
        return load_model(self.base_dir, self.math.config.model)

    def loss(self, model, domain: Domain) -> float:
        return heldout_loss(model, domain.data.heldout_sample(EVAL_SEED, 6, 8))


def domain_config(name: str, generator: str, tokenizer_dir: Path | None) -> DomainConfig:
    data = yaml.safe_load(yaml.safe_dump(TINY_DOMAIN))
    data["name"] = name
    data["model"]["inline"]["num_experts"] = NUM_EXPERTS
    data["data"]["train"] = [{"kind": "generated", "name": generator, "max_documents": 600}]
    if tokenizer_dir is not None:  # share the base model's tokenizer
        data["data"]["tokenizer"] = {"kind": "pretrained", "id": str(tokenizer_dir)}
    return parse_domain_config(data)


def selection_for(config: DomainConfig, experts: dict[int, list[int]], num_experts: int) -> ExpertSelection:
    return make_selection(
        experts,
        num_experts=num_experts,
        domain=config.name,
        model_id=config.model.name,
        model_revision=MODEL_REVISION,
        probe_tokens=1,
        score=0.0,
    )


def routing_shares(model, data: DomainData) -> dict[int, torch.Tensor]:
    """Per layer, the share of the domain's routing slots each expert receives."""
    blocks = data.train_blocks(0, 1)
    stats = probe_routing(
        model, (blocks[i : i + 8] for i in range(0, len(blocks), 8)), max_tokens=4096, progress=False
    )
    return {layer: counts / counts.sum() for layer, counts in stats.token_counts.items()}


def differential_experts(
    mine: dict[int, torch.Tensor], theirs: dict[int, torch.Tensor], count: int, exclude=None
) -> dict[int, list[int]]:
    """Per layer, the ``count`` experts with the largest (my share - their share), minus ``exclude``."""
    chosen = {}
    for layer, share in mine.items():
        order = sorted(range(len(share)), key=lambda e: -float(share[e] - theirs[layer][e]))
        banned = set((exclude or {}).get(layer, []))
        chosen[layer] = sorted([e for e in order if e not in banned][:count])
    return chosen


def pretrain(model, math_data: DomainData, code_data: DomainData, steps: int) -> None:
    """A few full-model AdamW steps alternating math+English and code batches (seeded)."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loaders = (math_data.mixture_loader(8, seed=0), code_data.train_loader(0, 1, 8, seed=0))
    for step in range(steps):
        batch = next(loaders[step % 2])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def train(model, domain: Domain, *, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train the domain's selected experts of ``model`` in place; returns them (canonical keys)."""
    cfg = TrainingConfig(
        inner_steps=steps, lr=3e-3, batch_size=8, residency="full", seed=seed, weight_decay=0.0
    )
    trainer = SparseTrainer(model, domain.selection.experts_by_layer, cfg)
    trainer.train(domain.data.train_loader(0, 1, 8, seed=seed), steps, progress=False)
    trainer.finish()
    model.eval()
    return read_experts(model, domain.selection.experts_by_layer)


def record(
    world: World,
    domain: Domain,
    experts: dict[str, torch.Tensor],
    *,
    cycle: int,
    parent: dict[str, torch.Tensor],
):
    """Record ``experts`` as the domain's next version (as a lead validator would)."""
    world.library.put_domain(domain.config, domain.selection)
    world.library.put_base(domain.selection.model_id, MODEL_REVISION, str(world.base_dir))
    draft = VersionDraft(
        domain=domain.config.name,
        model_id=domain.selection.model_id,
        model_revision=MODEL_REVISION,
        selection_digest=domain.selection.digest,
        config_digest=config_digest(domain.config),
        cycle=cycle,
        tensors_sha256=state_revision(experts),
        store=None,
        domain_loss=None,
        general_loss=None,
        eval_seed=None,
        parent_revision=state_revision(parent),
        decision="best_single",
        contributors=(
            Contributor(hotkey="5Ftest", uid=1, weight=1.0, tensors_sha256=state_revision(experts)),
        ),
        merge_record_sha256="0" * 64,
        lead_hotkey="5Flead",
        block=cycle * 10,
    )
    return world.library.record(draft, experts)[0]


def build_world(root: Path) -> World:
    math_cfg = domain_config("tiny-math", "math", None)
    math_data = build_domain_data(math_cfg.data, cache_dir=root / "cache", model=math_cfg.model)
    base = build_model(math_cfg.model)
    base_dir = root / "base"
    math_data.tokenizer.save_pretrained(base_dir)
    code_cfg = domain_config("tiny-code", "code", base_dir)
    code_data = build_domain_data(code_cfg.data, cache_dir=root / "cache", model=code_cfg.model)
    pretrain(base, math_data, code_data, PRETRAIN_STEPS)
    base.save_pretrained(base_dir)
    math_shares, code_shares = routing_shares(base, math_data), routing_shares(base, code_data)
    math_experts = differential_experts(math_shares, code_shares, 1)
    code_experts = differential_experts(code_shares, math_shares, 1, exclude=math_experts)
    return World(
        root=root,
        base_dir=base_dir,
        library=Library(root / "library"),
        math=Domain(math_cfg, math_data, selection_for(math_cfg, math_experts, NUM_EXPERTS)),
        code=Domain(code_cfg, code_data, selection_for(code_cfg, code_experts, NUM_EXPERTS)),
    )


_BUILT: dict[str, World] = {}


def shared_world(tmp_path_factory) -> World:
    """One world per pytest process (the compose and export tests share it; recording is idempotent)."""
    if "world" not in _BUILT:
        _BUILT["world"] = build_world(tmp_path_factory.mktemp("library-world"))
    return _BUILT["world"]
