"""The operator docs cannot drift from the code: generated blocks, fields, flags, reasons, links.

``scripts/gen_config_docs.py`` writes the config reference (docs/owner.md) and the neuron flag
tables (docs/miner.md, docs/validator.md); these tests fail when a committed block differs from
what the code generates now, and name the command that fixes it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from connito.node.neuron_flags import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_the_code(gen) -> None:
    """The config reference and the flag tables in docs/ are exactly what the code generates."""
    assert gen.stale_blocks() == [], "stale generated docs: run python scripts/gen_config_docs.py"


def test_every_config_field_is_described_and_in_the_owner_doc(gen) -> None:
    """Each field of the domain schema has a description and a row (by full path) in docs/owner.md."""
    owner = (DOCS / "owner.md").read_text()
    fields = list(gen.config_fields())
    assert len(fields) > 50
    for path, field in fields:
        assert field.description, f"{path}: add Field(description=...) in connito/config.py"
        assert f"| `{path}` |" in owner, path


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_every_neuron_flag_is_in_its_doc(role: str) -> None:
    doc = (DOCS / f"{role}.md").read_text()
    for action in build_parser(role)._actions:  # noqa: SLF001 - the parser's own flag list
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in doc, f"{role}: {flag}"


def test_replace_block_rewrites_only_between_the_markers(gen) -> None:
    begin, end = gen.BEGIN.format(name="x"), gen.END.format(name="x")
    text = f"head\n{begin}\nold\n{end}\ntail\n"
    assert gen.replace_block(text, "x", "new") == f"head\n{begin}\n\nnew\n\n{end}\ntail\n"
    with pytest.raises(ValueError, match="needs exactly one"):
        gen.replace_block("no markers here\n", "x", "new", where="docs/x.md")


# Every rejection reason a validator can record, as written in the code.
_REASON_PATTERNS = (
    r'InvalidSubmission\(\s*"([a-z_]+)"',
    r'_reject\(\s*candidate,\s*"([a-z_]+)"',
    r'_violation = "([a-z_]+)"',
    r'_violation = "([a-z_]+)" if .* else "([a-z_]+)"',
    r'return "([a-z_]+)", "',
    r'return \(\s*"([a-z_]+)",',
    r'\("[a-z_]+", manifest\.[a-z_]+, [^\n]*, "([a-z_]+)"\)',
)


# Files that judge miners' submissions (the global state's own checks and the stores' failure
# classes are reported differently: as "global fetch failed" and as store_<reason>).
_JUDGING = (
    "protocol/checkpoint.py",
    "protocol/safetensors_header.py",
    "protocol/strict_loader.py",
    "protocol/payload.py",
    "protocol/submissions.py",
    "protocol/scoring.py",
    "protocol/own_work.py",
    "node/validator.py",
)


def _code_reasons() -> set[str]:
    reasons: set[str] = set()
    for path in (REPO / "connito" / name for name in _JUDGING):
        text = path.read_text()
        for pattern in _REASON_PATTERNS:
            for match in re.finditer(pattern, text):
                reasons.update(group for group in match.groups() if group)
    return reasons


def test_every_rejection_reason_is_explained_to_miners() -> None:
    """docs/miner.md's table explains each reason the validator code can record."""
    reasons = _code_reasons()
    assert {"stale", "duplicate", "no_commit", "late_reveal", "shape", "wrong_domain"} <= reasons
    assert {"replay", "near_copy", "trained_on_eval_pool", "not_own_work"} <= reasons
    doc = (DOCS / "miner.md").read_text()
    missing = sorted(r for r in reasons if f"`{r}`" not in doc)
    assert not missing, f"add to the rejection table in docs/miner.md: {missing}"


def _relative_links(path: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    return [
        link.split("#")[0] for link in links if not link.startswith(("http://", "https://", "#", "mailto:"))
    ]


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(doc: str) -> None:
    path = REPO / doc
    for link in _relative_links(path):
        assert (path.parent / link).exists(), f"{doc}: broken link {link}"


def test_readme_quickstart_is_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands


_CODE_PATH = re.compile(r"(?<![\w/.-])(connito/[\w/]*\w)(\.py)?")
_MODULE_NAME = re.compile(r"(?<![\w./-])(connito(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    """``connito.a.b`` is a module, or a module's attribute (``connito.owner.bootstrap.pretrain_base``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:  # a parent is a module, not a package: the name is an attribute
            spec = None
        if spec is None:
            continue
        module = importlib.import_module(module_name)
        rest = parts[cut:]
        return len(rest) <= 1 and all(hasattr(module, name) for name in rest)
    return False


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_code_references_in_docs_exist(doc: str) -> None:
    """Every ``connito/...`` path and ``connito.x.y`` module or logger name a doc names is real."""
    text = (REPO / doc).read_text()
    missing = [m.group(0) for m in _CODE_PATH.finditer(text) if not (REPO / m.group(0)).exists()]
    missing += [name for name in set(_MODULE_NAME.findall(text)) if not _resolves(name)]
    assert not missing, f"{doc}: names code that is not there: {sorted(set(missing))}"


def test_a_stale_code_reference_is_caught() -> None:
    """The reference check knows a moved module, a missing attribute and a real one apart."""
    assert not _resolves("connito.validator")  # moved to connito.node.validator
    assert not _resolves("connito.node.validator.no_such_name")
    assert _resolves("connito.node.validator") and _resolves("connito.owner.bootstrap.pretrain_base")
    assert [m.group(0) for m in _CODE_PATH.finditer("see `connito/validator.py` and connito/ml/")] == [
        "connito/validator.py",
        "connito/ml",
    ]
