"""``relseg models``: list installed model versions, choose the default, roll back, inspect one."""

from __future__ import annotations

import argparse
import json
import numbers

from . import add_progress_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list models, choose the default, roll back",
        description="Shipped and fine-tuned model versions. The default model (used when --model is not given) "
                    "changes only through 'use', 'rollback' or 'register --default'.",
    )
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="installed models, the default marked with *").set_defaults(func=run_list)
    use = actions.add_parser("use", help="make an installed model the default (checks its SHA-256 first)")
    use.add_argument("name")
    use.set_defaults(func=run_use)
    actions.add_parser("rollback", help="go back to the previous default").set_defaults(func=run_rollback)
    show = actions.add_parser("show", help="print a model's card")
    show.add_argument("name")
    show.set_defaults(func=run_show)
    add = actions.add_parser("register", help="copy a model (.pt with its .json card) into the local registry")
    add.add_argument("path")
    add.add_argument("--default", action="store_true", help="also make it the default")
    add.set_defaults(func=run_register)
    install = actions.add_parser("install", help="download a model listed in a models index (resumable, verified)")
    install.add_argument("name")
    install.add_argument("--index", required=True, metavar="URL", help="models index: a JSON list of models")
    install.add_argument("--default", action="store_true", help="also make it the default")
    add_progress_argument(install)
    install.set_defaults(func=run_install)
    ensemble = actions.add_parser(
        "ensemble", help="one model that averages the probabilities of several trained runs of one recipe",
        description="Write NAME.pt and its card: the members' class probabilities averaged, slice by slice. The "
                    "members must share architecture, classes, role and input recipe; the card keeps each "
                    "member's name, SHA-256 and training command, and the first member's postprocessing.")
    ensemble.add_argument("members", nargs="+", metavar="MODEL", help="installed model names or .pt paths")
    ensemble.add_argument("--out", required=True, metavar="NAME.pt", help="where to write the ensemble")
    ensemble.add_argument("--model-version", default="1.0.0", help="the ensemble card's version")
    ensemble.add_argument("--description", default="", help="the ensemble card's description")
    ensemble.set_defaults(func=run_ensemble)


def run_list(args: argparse.Namespace) -> int:
    from ..registry import ModelRegistry

    entries = ModelRegistry().list()
    if not entries:
        print("no models installed")
        return 0
    rows = [("", "NAME", "VERSION", "ORIGIN", "PARENT", "DATE", "METRIC")]
    rows += [("*" if e.is_default else "", e.name, e.version, e.origin, e.parent or "-", e.date or "-",
              headline_metric(e.metrics)) for e in entries]
    print(format_table(rows))
    return 0


def run_use(args: argparse.Namespace) -> int:
    from ..registry import ModelRegistry

    entry = ModelRegistry().use(args.name)
    print(f"default model: {entry.name} {entry.version}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from ..registry import ModelRegistry

    registry = ModelRegistry()
    name = registry.rollback()
    print(f"default model: {name} {registry.entry(name).version}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ..registry import ModelRegistry

    registry = ModelRegistry()
    entry = registry.entry(args.name)
    card = registry.card(args.name).to_dict()
    print(json.dumps({"origin": entry.origin, "is_default": entry.is_default, "path": str(entry.path), **card},
                     indent=2))
    return 0


def run_register(args: argparse.Namespace) -> int:
    from ..registry import ModelRegistry

    entry = ModelRegistry().register(args.path, make_default=args.default)
    print(f"registered {entry.name} {entry.version} ({entry.path})" + (" as the default" if entry.is_default else ""))
    return 0


def run_install(args: argparse.Namespace) -> int:
    from ..download import fetch_models_index
    from ..errors import ModelError
    from ..registry import ModelRegistry
    from . import progress_display

    entries = {entry["name"]: entry for entry in fetch_models_index(args.index)}
    if args.name not in entries:
        offered = ", ".join(sorted(entries)) or "none"
        raise ModelError(f"the models index {args.index} has no model {args.name!r}; it offers: {offered}")
    with progress_display(args.progress) as progress:
        entry = ModelRegistry().install(entries[args.name], progress, make_default=args.default)
    print(f"installed {entry.name} {entry.version} ({entry.path})" + (" as the default" if entry.is_default else ""))
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    import shlex

    from ..ensemble import make_ensemble

    command = "relseg " + shlex.join(args.argv)
    card = make_ensemble(args.members, args.out, args.model_version, args.description, command)
    print(f"wrote {card.path} ({card.name} {card.version}: {card.members} networks, probabilities averaged)")
    return 0


def headline_metric(metrics: dict) -> str:
    """The first Dice found in a card's (possibly nested) metrics, e.g. ``dice 0.712``; ``-`` if none."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            if "dice" in key.lower() and isinstance(value.get("mean"), numbers.Real):
                return f"{key} {value['mean']:.3f}"
            found = headline_metric(value)
            if found != "-":
                return found
        elif "dice" in key.lower() and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{key} {value:.3f}"
    return "-"


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
