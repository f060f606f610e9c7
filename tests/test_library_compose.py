"""Composing library versions: disjoint domains keep their quality, opt-out restores weights exactly,
conflicting lanes are refused unless a precedence is given, and a domain can start from a version."""

from __future__ import annotations

import pytest
import torch
from library_world import MODEL_REVISION, record, shared_world, train

from connito.config import parse_domain_config
from connito.errors import ConfigError, LibraryError
from connito.library import Library, VersionDraft, compose
from connito.library.composition import library_base_revision
from connito.ml.moe import read_experts
from connito.owner.bootstrap import load_base_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Math v1 and v2 (trained further) and code v1, each on its own experts."""
    world = shared_world(tmp_path_factory)
    base = world.base_model()
    genesis_math = read_experts(base, world.math.selection.experts_by_layer)
    math_v1 = train(base, world.math, steps=40)
    world.math_v1 = record(world, world.math, math_v1, cycle=0, parent=genesis_math)
    world.math_v2 = record(
        world, world.math, train(base, world.math, steps=10, seed=1), cycle=1, parent=math_v1
    )
    base = world.base_model()
    genesis_code = read_experts(base, world.code.selection.experts_by_layer)
    world.code_v1 = record(world, world.code, train(base, world.code, steps=40), cycle=0, parent=genesis_code)
    return world


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_disjoint_domains_compose_within_one_percent_of_each_single_domain_model(world):
    """Each domain's held-out loss in the math+code model is within 1% of its single-domain model."""
    both = compose(world.library, ["tiny-math@v1", "tiny-code@v1"]).model
    math_only = compose(world.library, ["tiny-math@v1"]).model
    code_only = compose(world.library, ["tiny-code@v1"]).model
    base = world.base_model()
    for domain, single in ((world.math, math_only), (world.code, code_only)):
        alone, together, untrained = (
            world.loss(single, domain),
            world.loss(both, domain),
            world.loss(base, domain),
        )
        assert alone < untrained * 0.997, (domain.config.name, alone, untrained)  # training mattered
        assert abs(together / alone - 1) < 0.01, (domain.config.name, together, alone)


def test_compose_writes_each_lane_experts_exactly(world):
    composition = compose(world.library, ["tiny-math@v1", "tiny-code@latest"])
    math_v1 = world.library.load_experts(world.math_v1)
    code_v1 = world.library.load_experts(world.code_v1)
    held = read_experts(composition.model, world.math.selection.experts_by_layer)
    held |= read_experts(composition.model, world.code.selection.experts_by_layer)
    assert all(torch.equal(held[k], v) for k, v in (math_v1 | code_v1).items())
    assert set(composition.owners.values()) == {"tiny-math@v1", "tiny-code@v1"}


def _copy(world, records, root) -> Library:
    """A private library holding copies of ``records`` (so a test's removals and extra versions stay local)."""
    library = Library(root)
    for record_ in records:
        domain = world.math if record_.domain == "tiny-math" else world.code
        library.put_domain(domain.config, domain.selection)
        library.put_base(record_.model_id, MODEL_REVISION, str(world.base_dir))
        fields = {f: getattr(record_, f) for f in VersionDraft.__dataclass_fields__ if f != "contributors"}
        library.record(
            VersionDraft(**fields, contributors=record_.contributors), world.library.load_experts(record_)
        )
    return library


def test_remove_restores_the_previous_weights_exactly(world, tmp_path):
    """Opt-out of v2: math@latest is v1 bit for bit; opt-out of v1 too: the base, bit for bit."""
    library = _copy(world, [world.math_v1, world.math_v2], tmp_path / "lib")
    v1_model = _params(compose(library, ["tiny-math@v1"]).model)
    assert not all(
        torch.equal(v, v1_model[k]) for k, v in _params(compose(library, ["tiny-math@latest"]).model).items()
    )
    library.remove("tiny-math@v2", reason="test opt-out")
    after = _params(compose(library, ["tiny-math@latest"]).model)
    assert after.keys() == v1_model.keys() and all(torch.equal(after[k], v1_model[k]) for k in after)
    library.remove("tiny-math@v1")
    base = _params(world.base_model())
    opted_out = _params(compose(library, ["tiny-math@latest"]).model)
    assert all(torch.equal(opted_out[k], base[k]) for k in base)
    with pytest.raises(LibraryError, match="tiny-math@v2 was removed"):
        compose(library, ["tiny-math@v2"])


def test_lanes_that_changed_the_same_expert_are_an_error_naming_both(world, tmp_path):
    """A code version trained on one of math's experts conflicts with math; a precedence resolves it."""
    from library_world import Domain, selection_for

    overlap = {
        layer: sorted(set(ids) | {world.math.selection.experts_by_layer[layer][0]})
        for layer, ids in world.code.selection.experts_by_layer.items()
    }
    code = Domain(
        world.code.config, world.code.data, selection_for(world.code.config, overlap, world.num_experts)
    )
    library = _copy(world, [world.math_v1, world.code_v1], tmp_path / "lib")
    private = type(world)(
        root=world.root, base_dir=world.base_dir, library=library, math=world.math, code=code
    )
    clash = record(
        private,
        code,
        train(world.base_model(), code, steps=3),
        cycle=5,
        parent=read_experts(world.base_model(), overlap),
    )
    lanes = ["tiny-math@v1", clash.name]
    with pytest.raises(
        LibraryError, match=rf"lanes tiny-math@v1 and {clash.name} both changed layer 0 expert"
    ):
        compose(library, lanes)
    winner = compose(library, lanes, precedence=["tiny-code", "tiny-math"])
    layer0 = world.math.selection.experts_by_layer[0][0]
    assert winner.owners[f"0.{layer0}"] == clash.name
    loser = compose(library, lanes, precedence=["tiny-math", "tiny-code"])
    assert loser.owners[f"0.{layer0}"] == "tiny-math@v1"
    with pytest.raises(LibraryError, match="one lane per domain"):
        compose(library, ["tiny-code@v1", clash.name])


def test_a_new_domain_starts_from_a_library_version(world):
    """``model.base: library:tiny-math@v1`` loads the base with v1's experts; the revision pins it."""
    data = world.math.config.model_dump(mode="json", exclude_none=True)
    data["name"] = "tiny-algebra"
    data["model"] = {"base": "library:tiny-math@v1"}
    config = parse_domain_config(data)
    model = load_base_model(config, library=world.library.root)
    expected = world.library.load_experts(world.math_v1)
    held = read_experts(model, world.math.selection.experts_by_layer)
    assert all(torch.equal(held[k], expected[k]) for k in expected)
    assert (
        library_base_revision(config.model.base, world.library.root)
        == f"tiny-math@v1:{world.math_v1.tensors_sha256}"
    )
    with pytest.raises(ConfigError, match="needs a library"):
        load_base_model(config)


@pytest.mark.parametrize("base", ["library:tiny-math@latest", "library:tiny-math", "library:", "hub:x@v1"])
def test_a_library_base_must_pin_a_version(world, base):
    data = world.math.config.model_dump(mode="json", exclude_none=True)
    data["model"] = {"base": base}
    with pytest.raises(ConfigError, match=r"model: .*library:DOMAIN@vN"):
        parse_domain_config(data)
