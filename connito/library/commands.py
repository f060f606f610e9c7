"""``connito library {list,show,compose,remove,rebuild}`` and ``connito export``: parsers and handlers.

``connito.cli`` adds these parsers and hands the parsed arguments here; library errors propagate
as ``ConnitoError`` and ``connito.cli`` turns them into one line on stderr (exit 1). Every command
takes ``--library PATH`` and ``--json`` (one JSON object on stdout instead of the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["DEFAULT_LIBRARY", "add_library_parsers", "run_library_command"]

DEFAULT_LIBRARY = Path("~/.connito/library")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--library",
        type=Path,
        default=DEFAULT_LIBRARY,
        metavar="PATH",
        help=f"expert library folder (path; default {DEFAULT_LIBRARY}; a localnet keeps its library at DIR/library)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text (flag)")


def _local(flag: str):  # noqa: ANN202 - an argparse type callable
    def parse(value: str) -> Path:
        kind, sep, path = value.partition(":")
        if kind != "local" or not sep or not path:
            raise argparse.ArgumentTypeError(f"{flag} must look like local:PATH, got {value!r}")
        return Path(path).expanduser()

    return parse


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {number}")
    return number


def add_library_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``library`` (with its verbs) and ``export`` to the ``connito`` parser."""
    library = sub.add_parser(
        "library", help="the expert library: list, show, compose, remove, rebuild versions"
    )
    verbs = library.add_subparsers(dest="library_command", required=True)
    p = verbs.add_parser("list", help="list versions (DOMAIN@vN), newest last per domain")
    p.add_argument("--domain", default=None, help="only this domain (the domain YAML's name; default all)")
    _common(p)
    p = verbs.add_parser("show", help="one version in full: metrics, lineage, store location, history")
    p.add_argument("version", help="DOMAIN@vN, DOMAIN@latest or DOMAIN")
    _common(p)
    p = verbs.add_parser("compose", help="write one full model with each lane's experts")
    p.add_argument("--lanes", required=True, help="comma-separated versions, e.g. math@latest,code@v3")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (save_pretrained layout + tokenizer)"
    )
    p.add_argument(
        "--precedence",
        default=None,
        help="comma-separated domains, first wins, for experts two lanes changed (default none: such a conflict is an error)",
    )
    p.add_argument(
        "--base", type=Path, default=None, help="base model folder (default: where the library recorded it)"
    )
    _common(p)
    p = verbs.add_parser(
        "remove", help="opt a version out: no longer served; latest falls back; history kept"
    )
    p.add_argument("version", help="DOMAIN@vN (or DOMAIN@latest: the newest one not removed)")
    p.add_argument("--reason", default="", help="why, kept in the library's history (default empty)")
    _common(p)
    p = verbs.add_parser(
        "rebuild", help="record every global the lead published, from the chain and the store"
    )
    p.add_argument("--config", required=True, type=Path, help="the domain YAML the validators ran")
    p.add_argument(
        "--chain", required=True, type=_local("--chain"), metavar="local:PATH", help="LocalChain ledger"
    )
    p.add_argument(
        "--hub", required=True, type=_local("--hub"), metavar="local:PATH", help="LocalStore folder"
    )
    p.add_argument("--selection", required=True, type=Path, help="the domain's SELECTION.json")
    p.add_argument("--base", required=True, type=Path, help="base model folder (save_pretrained layout)")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="data and tokenizer cache (default LIBRARY/cache)"
    )
    _common(p)
    p = sub.add_parser(
        "export", help="write a right-sized model for one domain (plain transformers checkpoint)"
    )
    p.add_argument("--domain", required=True, help="domain name (the domain YAML's name)")
    p.add_argument(
        "--keep-fraction", required=True, type=_fraction, help="share of each layer's experts kept, in (0, 1]"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--version", default=None, help="vN of the domain to export (default latest)")
    p.add_argument(
        "--base", type=Path, default=None, help="base model folder (default: where the library recorded it)"
    )
    p.add_argument(
        "--config", type=Path, default=None, help="domain YAML for data (default: the one recorded)"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="data and tokenizer cache (default LIBRARY/cache)"
    )
    p.add_argument(
        "--eval-batches", type=int, default=16, help="held-out batches of 8 sequences (default 16)"
    )
    _common(p)


def run_library_command(args: argparse.Namespace) -> int:
    """Run ``connito library VERB`` or ``connito export``; returns the exit code."""
    from connito.library.index import Library

    library = Library(args.library)
    if args.command == "export":
        return _export(library, args)
    handler = {"list": _list, "show": _show, "compose": _compose, "remove": _remove, "rebuild": _rebuild}
    return handler[args.library_command](library, args)


def _emit(args: argparse.Namespace, body: dict, text: list[str]) -> int:
    if args.json:
        sys.stdout.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in text))
    return 0


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _row(record) -> str:  # noqa: ANN001 - VersionRecord, imported lazily
    contributors = ",".join(f"uid{c.uid}:{c.weight:.2f}" for c in record.contributors)
    status = "removed" if record.is_removed else ""
    block = str(record.block) if record.block is not None else "-"
    return (
        f"{record.name:<22} {record.cycle:>5} {record.decision:<11} {_loss(record.domain_loss):>11} "
        f"{_loss(record.general_loss):>12} {record.parent or 'base':<22} {block:>7}  {contributors} {status}"
    ).rstrip()


def _list(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    records = library.versions(args.domain)
    header = f"{'VERSION':<22} {'CYCLE':>5} {'DECISION':<11} {'DOMAIN_LOSS':>11} {'GENERAL_LOSS':>12} {'PARENT':<22} {'BLOCK':>7}  CONTRIBUTORS"
    text = [header, *(_row(r) for r in records)] if records else [f"no versions in {library.root}"]
    body = {"library": str(library.root), "versions": [r.model_dump(mode="json") for r in records]}
    return _emit(args, body, text)


def _show(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    record = library.get(args.version)
    events = library.events(record.name)
    evals = library.evals(record.name)
    body = {
        **record.model_dump(mode="json"),
        "events": [{"at": e.at, "kind": e.kind, "detail": e.detail} for e in events],
        "evals": evals,
    }
    text = [
        f"{key}: {value}" for key, value in record.model_dump(mode="json", exclude={"contributors"}).items()
    ]
    text += [
        f"contributor: hotkey={c.hotkey} uid={c.uid} weight={c.weight:.4f} rev={c.tensors_sha256[:12]}"
        for c in record.contributors
    ]
    text += [f"event: {e.kind} {e.detail}" for e in events]
    text += [f"eval: {json.dumps(e['result'].get('results', e['result']), sort_keys=True)}" for e in evals]
    return _emit(args, body, text)


def _compose(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    from connito.library.composition import compose, parse_lanes, save_composition

    precedence = [d.strip() for d in args.precedence.split(",") if d.strip()] if args.precedence else []
    composition = compose(library, parse_lanes(args.lanes), precedence=precedence, base_dir=args.base)
    save_composition(composition, args.out)
    lanes = {lane.request: lane.record.name if lane.record else None for lane in composition.lanes}
    body = {
        "out": str(args.out),
        "lanes": lanes,
        "owners": composition.owners,
        "base": composition.base_location,
    }
    text = [f"lane {request}: {name or 'no version left (base weights)'}" for request, name in lanes.items()]
    text.append(
        f"wrote {args.out}: {len(composition.owners)} experts from the library on base {composition.base_location}"
    )
    return _emit(args, body, text)


def _remove(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    from connito.errors import LibraryError

    record, removed = library.remove(args.version, reason=args.reason)
    try:
        latest = library.get(f"{record.domain}@latest").name
    except LibraryError:
        latest = None
    body = {"removed": record.name, "newly_removed": removed, "latest": latest}
    verb = "removed" if removed else "already removed:"
    text = [
        f"{verb} {record.name}; {record.domain}@latest is now {latest or 'the base model (no version left)'}"
    ]
    return _emit(args, body, text)


def _rebuild(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    from connito.chain.local import LocalChain
    from connito.config import load_domain_config
    from connito.data import build_domain_data
    from connito.hub import LocalStore
    from connito.library.recorder import rebuild_library
    from connito.ml.selection_record import load_domain_selection

    config = load_domain_config(args.config)
    selection = load_domain_selection(args.selection, config)
    data = build_domain_data(
        config.data, cache_dir=args.cache_dir or library.root / "cache", model=config.model
    )
    records = rebuild_library(
        library,
        chain=LocalChain.open(args.chain),
        store=LocalStore(args.hub),
        config=config,
        selection=selection,
        base_dir=args.base,
        data=data,
    )
    body = {"library": str(library.root), "recorded": [r.name for r in records]}
    text = [_row(r) for r in records] + [f"rebuilt {len(records)} versions into {library.root}"]
    return _emit(args, body, text)


def _export(library, args: argparse.Namespace) -> int:  # noqa: ANN001
    from connito.config import load_domain_config
    from connito.library.export import export_domain

    config = load_domain_config(args.config) if args.config is not None else None
    report = export_domain(
        library,
        args.domain,
        keep_fraction=args.keep_fraction,
        out=args.out,
        version=args.version,
        base_dir=args.base,
        config=config,
        cache_dir=args.cache_dir,
        eval_batches=args.eval_batches,
    )
    general = (
        f"general held-out loss {report.general_loss_exported:.4f} (full model {report.general_loss_full:.4f})"
        if report.general_loss_full is not None and report.general_loss_exported is not None
        else "general held-out loss: no general data"
    )
    text = [
        f"export {report.version} keep-fraction {report.keep_fraction}: {report.kept_per_layer} of "
        f"{report.num_experts} experts per layer, top-k {report.top_k}",
        f"parameters {report.params_exported:,} of {report.params_full:,} ({report.param_fraction:.1%}); "
        f"expert parameters {report.expert_params_exported:,} of {report.expert_params_full:,} "
        f"({report.expert_param_fraction:.1%})",
        f"domain held-out loss {report.domain_loss_exported:.4f} (full model {report.domain_loss_full:.4f}, "
        f"{report.domain_loss_change:+.2%}) on {report.eval_tokens:,} tokens",
        general,
        f"wrote {report.out} (AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it)",
    ]
    return _emit(args, report.to_json(), text)
