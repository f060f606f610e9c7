"""``connito pin``: turn a domain's moving Hub references into commit shas before launch.

A branch name (``main``) is a promise that every node reads the same bytes only until someone
pushes: a dataset fix upstream moves documents across the held-out line on some nodes and not
on others, and a model update splits the network's base weights. The owner runs ``connito pin``
once before ``connito select``: it asks the Hub which commit each reference points at now and
writes those shas into the YAML, leaving its comments and layout as they are.

Only ``model.revision`` and the ``revision`` of ``kind: hub`` data sources change. The edit is
textual (the YAML keeps its comments) and then checked: the rewritten file must load and carry
exactly the resolved shas, otherwise nothing is written and the command names what to set by hand.

May import: connito.config, connito.errors, connito.fsutil, connito.hub, huggingface_hub.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from connito.config import DataSource, DomainConfig, load_domain_config, parse_domain_config
from connito.errors import ConfigError
from connito.fsutil import atomic_write
from connito.hub.base import is_commit_sha

__all__ = ["Pin", "pin_domain", "resolve_with_hub", "run_pin"]

_FLOW_SOURCE = re.compile(r"^(?P<head>\s*-\s*\{)(?P<body>[^{}]*)(?P<tail>\}\s*(#.*)?)$")

# (kind "model" | "dataset", repo id, revision) -> commit sha
Resolver = Callable[[str, str, str], str]


@dataclass(frozen=True, slots=True)
class Pin:
    """One reference of the YAML and the commit it now names."""

    field: str  # "model.revision" or "data.train[0].revision"
    repo: str
    was: str | None
    sha: str


def resolve_with_hub(environ: Mapping[str, str]) -> Resolver:
    """A resolver asking the Hub at ``HF_ENDPOINT`` (token ``HF_TOKEN`` for gated or private repos)."""
    api = HfApi(endpoint=environ.get("HF_ENDPOINT") or None, token=environ.get("HF_TOKEN") or False)

    def resolve(kind: str, repo: str, revision: str) -> str:
        try:
            if kind == "model":
                sha = api.model_info(repo, revision=revision).sha
            else:
                sha = api.dataset_info(repo, revision=revision).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ConfigError(
                f"{kind} {repo}@{revision} not found on the Hub ({type(exc).__name__})"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"cannot resolve {kind} {repo}@{revision}: {first}") from None
        if not is_commit_sha(sha):
            raise ConfigError(f"the Hub answered {sha!r} for {kind} {repo}@{revision}, not a commit sha")
        return str(sha)

    return resolve


def pin_domain(config_path: Path, resolve: Resolver, *, out: Path | None = None) -> list[Pin]:
    """Resolve every unpinned reference of ``config_path`` and write the pinned YAML to ``out``.

    ``out`` defaults to ``config_path`` (replaced atomically). Returns the pins made; an empty
    list means the file was already pinned and nothing was written.

    Raises:
        ConfigError: the YAML does not load, a reference does not resolve, or the rewritten
            file would not carry exactly the resolved shas (nothing written).
    """
    config = load_domain_config(config_path)
    pins = _resolve_all(config, _naming(resolve, config_path))
    if not pins:
        return []
    text = config_path.read_text(encoding="utf-8")
    pinned_text = _rewrite(text, pins)
    target = out or config_path
    _check_rewrite(pinned_text, pins, config_path)
    atomic_write(target, pinned_text.encode("utf-8"))
    return pins


def _naming(resolve: Resolver, config_path: Path) -> Resolver:
    """``resolve``, its one-line errors prefixed with the YAML file they come from."""

    def named(kind: str, repo: str, revision: str) -> str:
        try:
            return resolve(kind, repo, revision)
        except ConfigError as exc:
            field = "model.revision" if kind == "model" else f"data source {repo}"
            raise ConfigError(exc.reason, path=str(config_path), field=field) from None

    return named


def _hub_sources(config: DomainConfig) -> list[tuple[str, DataSource]]:
    data = config.data
    groups = {"train": data.train, "validation": data.validation, "general": data.general}
    return [
        (f"data.{group}[{i}].revision", source)
        for group, sources in groups.items()
        for i, source in enumerate(sources)
        if source.kind == "hub"
    ]


def _resolve_all(config: DomainConfig, resolve: Resolver) -> list[Pin]:
    pins: list[Pin] = []
    model = config.model
    hub_model = model.id is not None and not Path(model.id).exists()  # not a folder or library base
    if model.id is not None and hub_model and not is_commit_sha(model.revision):
        pins.append(
            Pin("model.revision", model.id, model.revision, resolve("model", model.id, model.revision))
        )
    resolved: dict[tuple[str, str], str] = {}  # one question per (repo, revision)
    for field, source in _hub_sources(config):
        if is_commit_sha(source.revision) or Path(source.name).exists():
            continue
        revision = source.revision or "main"
        key = (source.name, revision)
        if key not in resolved:
            resolved[key] = resolve("dataset", source.name, revision)
        pins.append(Pin(field, source.name, source.revision, resolved[key]))
    return pins


def _rewrite(text: str, pins: list[Pin]) -> str:
    """Set each pin's revision in the YAML text, keeping every other byte."""
    lines = text.splitlines(keepends=True)
    model_pin = next((pin for pin in pins if pin.field == "model.revision"), None)
    if model_pin is not None:
        _set_model_revision(lines, model_pin.sha)
    source_pins = [pin for pin in pins if pin.field != "model.revision"]
    for index, line in enumerate(lines):
        match = _FLOW_SOURCE.match(line.rstrip("\n"))
        if match is None or "kind: hub" not in match["body"]:
            continue
        body = match["body"]
        revision = re.search(r"\brevision:\s*([^,\s]+)", body)
        was = revision[1] if revision else None  # a line already at a commit has no pin: left alone
        pin = next(
            (
                p
                for p in source_pins
                if p.was == was and re.search(rf"\bname:\s*{re.escape(p.repo)}\s*(,|$)", body)
            ),
            None,
        )
        if pin is None:
            continue
        if revision is not None:
            body = body[: revision.start(1)] + pin.sha + body[revision.end(1) :]
        else:
            body = body.rstrip() + f", revision: {pin.sha}"
        newline = "\n" if line.endswith("\n") else ""
        lines[index] = f"{match['head']}{body}{match['tail']}{newline}"
    return "".join(lines)


def _set_model_revision(lines: list[str], sha: str) -> None:
    """Replace (or add) ``revision:`` inside the top-level ``model:`` block."""
    start = next((i for i, line in enumerate(lines) if re.match(r"^model:\s*(#.*)?$", line)), None)
    if start is None:
        return  # left to the check, which names the field
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()),
        len(lines),
    )
    for i in range(start + 1, end):
        match = re.match(r"^(\s+revision:\s*)(\S+)(\s*)(#.*)?$", lines[i].rstrip("\n"))
        if match is not None:
            comment = match[4] or ""
            if comment:  # keep the comment's column when the sha fits before it
                column = len(match[1]) + len(match[2]) + len(match[3])
                comment = " " * max(2, column - len(match[1]) - len(sha)) + comment
            lines[i] = f"{match[1]}{sha}{comment}\n"
            return
    lines.insert(start + 1, f"  revision: {sha}\n")


def _check_rewrite(pinned_text: str, pins: list[Pin], config_path: Path) -> None:
    """The rewritten YAML must load and name exactly the resolved shas; else write nothing."""
    by_field = {pin.field: pin.sha for pin in pins}
    try:
        config = parse_domain_config(yaml.safe_load(pinned_text), path=str(config_path))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(
            f"{config_path}: pinning would break the YAML ({exc}); set by hand: {by_field}"
        ) from None
    found: dict[str, str | None] = {"model.revision": config.model.revision}
    found.update({field: source.revision for field, source in _hub_sources(config)})
    wrong = {field: sha for field, sha in by_field.items() if found.get(field) != sha}
    if wrong:
        raise ConfigError(
            f"{config_path}: could not place every pin in the text (block-style sources?); set by hand: {wrong}"
        )


def run_pin(config_path: Path, *, out: Path | None = None) -> int:
    """The CLI verb: pin against ``HF_ENDPOINT`` and print one line per pin."""
    pins = pin_domain(config_path, resolve_with_hub(os.environ), out=out)
    target = out or config_path
    if not pins:
        print(f"{config_path}: already pinned (model and every hub source name a commit sha)")
        return 0
    for pin in pins:
        print(f"{pin.field}: {pin.repo}@{pin.was or 'main'} -> {pin.sha}")
    print(f"wrote {target}; run `connito select` again if a selection was made before pinning")
    return 0
