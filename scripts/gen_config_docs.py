"""Generate the reference blocks of the operator docs from the code, so they cannot drift.

- ``docs/owner.md``: every domain config field (path, type, default, constraints, description),
  walked from the pydantic schema in ``connito/config.py``;
- ``docs/miner.md`` and ``docs/validator.md``: every neuron flag, walked from the argparse parser
  in ``connito/node/neuron_flags.py``.

Each block sits between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->``;
the hand-written text around it is never touched. ``tests/test_docs.py`` fails when a committed
block differs from what this script generates.

    python scripts/gen_config_docs.py           # rewrite the blocks in place
    python scripts/gen_config_docs.py --check   # exit 1 and name the stale blocks
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: import the checkout's connito
    sys.path.insert(0, str(REPO))

from connito.config import DomainConfig  # noqa: E402
from connito.fsutil import atomic_write  # noqa: E402
from connito.node.neuron_flags import build_parser  # noqa: E402

__all__ = [
    "BLOCKS",
    "config_reference",
    "neuron_flags",
    "replace_block",
    "stale_blocks",
    "write_blocks",
    "main",
]

BEGIN = "<!-- BEGIN GENERATED: {name} (scripts/gen_config_docs.py; do not edit by hand) -->"
END = "<!-- END GENERATED: {name} -->"


# Domain config -----------------------------------------------------------------------------------


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if _is_model(item):
            return item
    return None


def _type_name(annotation: Any) -> str:
    """A YAML reader's name for a type: ``int or null``, ``"a" / "b"``, ``list of DataSource``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " / ".join(f'"{value}"' for value in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin is dict:
        return "mapping"
    if _is_model(annotation):
        return annotation.__name__
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(annotation, str(annotation))


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    return str(value)


def _default(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        made = field.default_factory()  # type: ignore[call-arg]
        return "(section defaults)" if isinstance(made, BaseModel) else f"`{_yaml_value(made)}`"
    value = field.default
    text = f"`{_yaml_value(value)}`"
    if name.endswith("_bytes") and isinstance(value, int) and value >= 2**10:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= size:
                return f"{text} ({value / size:g} {unit})"
    return text


def _constraints(field: FieldInfo) -> str:
    """Bounds as written in the schema: ``>= 1``, ``> 0, <= 1``, ``at least 1 item``, a pattern."""
    parts: list[str] = []
    unit = "character(s)" if field.annotation is str else "item(s)"
    for item in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                parts.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} {unit}")
        if getattr(item, "max_length", None) is not None:
            parts.append(f"at most {item.max_length} {unit}")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _config_sections() -> list[tuple[list[str], type[BaseModel]]]:
    """(paths, model) per section in schema order; a model used at several paths is one section."""
    found: dict[type[BaseModel], list[str]] = {}

    def walk(model: type[BaseModel], path: str) -> None:
        found.setdefault(model, []).append(path)
        if len(found[model]) > 1:
            return
        for name, field in model.model_fields.items():
            child = f"{path}.{name}" if path else name
            if _is_model(field.annotation):
                walk(field.annotation, child)
            elif (item := _list_item_model(field.annotation)) is not None:
                walk(item, child + "[]")

    walk(DomainConfig, "")
    return [(paths, model) for model, paths in found.items()]


def config_fields() -> Iterator[tuple[str, FieldInfo]]:
    """Every field of the domain config as (full path, field), in schema order."""
    for paths, model in _config_sections():
        prefix = paths[0]
        for name, field in model.model_fields.items():
            yield (f"{prefix}.{name}" if prefix else name), field


def config_reference() -> str:
    """The domain config reference: one table per section, rows in schema order."""
    lines: list[str] = []
    for paths, model in _config_sections():
        prefix = paths[0]
        title = ", ".join(f"`{p}`" for p in paths) if prefix else "top level"
        lines += [f"### {title} ({model.__name__})", ""]
        doc = " ".join((model.__doc__ or "").split())
        if doc:
            lines += [doc, ""]
        if len(paths) > 1:
            others = ", ".join(f"`{p}`" for p in paths[1:])
            lines += [f"The same fields apply under {others}.", ""]
        lines += ["| field | type | default | constraints | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            row = (f"`{path}`", _type_name(field.annotation), _default(name, field), _constraints(field))
            lines.append("| " + " | ".join(_cell(c) for c in (*row, field.description or "")) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# Neuron flags ------------------------------------------------------------------------------------


def _flag_value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "(flag)"
    if action.metavar is not None:
        return f"`{action.metavar}`"
    if action.choices is not None:
        return " / ".join(f"`{choice}`" for choice in action.choices)
    return f"`{action.dest.upper()}`"


def _flag_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "not set"
    if action.default is None:
        return "none"
    value = action.default
    if isinstance(value, tuple):  # parsed specs such as --hub's ("hf", None)
        value = value[0]
    return f"`{value}`"


def neuron_flags(role: str) -> str:
    """Every flag of ``neurons/<role>.py``, grouped as ``--help`` groups them."""
    parser = build_parser(role)  # type: ignore[arg-type]
    formatter = argparse.HelpFormatter(parser.prog)
    lines: list[str] = []
    for group in parser._action_groups:  # noqa: SLF001 - argparse exposes groups no other way
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS]  # noqa: SLF001
        actions = [a for a in actions if not isinstance(a, argparse._HelpAction)]  # noqa: SLF001
        if not actions:
            continue
        title = "general" if group.title in ("options", "optional arguments") else group.title
        lines += [f"### {title}", "", "| flag | value | default | meaning |", "| --- | --- | --- | --- |"]
        for action in actions:
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
            meaning = formatter._expand_help(action) if action.help else ""  # noqa: SLF001 - expands %(default)s
            row = (flags, _flag_value(action), _flag_default(action), meaning)
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# Blocks in files ---------------------------------------------------------------------------------

BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "config-reference": ("docs/owner.md", config_reference),
    "miner-flags": ("docs/miner.md", lambda: neuron_flags("miner")),
    "validator-flags": ("docs/validator.md", lambda: neuron_flags("validator")),
}


def replace_block(text: str, name: str, body: str, *, where: str = "<text>") -> str:
    """``text`` with the lines between the block's markers replaced by ``body``.

    Raises:
        ValueError: a marker is missing, repeated or out of order (names the file and block).
    """
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{where}: needs exactly one {begin!r} and one {end!r}")
    head, rest = text.split(begin, 1)
    old, tail = rest.split(end, 1)
    if end in head or "\n" not in old:
        raise ValueError(f"{where}: block {name!r}: markers must be on their own lines, BEGIN before END")
    return f"{head}{begin}\n\n{body.rstrip()}\n\n{end}{tail}"


def _rendered(repo: Path) -> dict[Path, tuple[str, str]]:
    """path -> (current text, text with every block regenerated)."""
    out: dict[Path, tuple[str, str]] = {}
    for name, (relpath, generate) in BLOCKS.items():
        path = repo / relpath
        current = out[path][1] if path in out else path.read_text(encoding="utf-8")
        original = out[path][0] if path in out else current
        out[path] = (original, replace_block(current, name, generate(), where=relpath))
    return out


def stale_blocks(repo: Path = REPO) -> list[str]:
    """The files whose generated blocks differ from what the code generates now."""
    return [str(path.relative_to(repo)) for path, (old, new) in _rendered(repo).items() if old != new]


def write_blocks(repo: Path = REPO) -> list[str]:
    """Regenerate every block in place (atomically); return the files that changed."""
    changed = []
    for path, (old, new) in _rendered(repo).items():
        if old != new:
            atomic_write(path, new.encode("utf-8"))
            changed.append(str(path.relative_to(repo)))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    try:
        stale = stale_blocks() if args.check else write_blocks()
    except (OSError, ValueError) as exc:
        print(f"gen_config_docs: {exc}", file=sys.stderr)
        return 1
    if args.check and stale:
        print(
            f"gen_config_docs: stale: {', '.join(stale)}; run python scripts/gen_config_docs.py",
            file=sys.stderr,
        )
        return 1
    print("\n".join(f"updated {path}" for path in stale) or "docs up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
