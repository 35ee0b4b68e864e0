"""The `immunize` command line.

Each subcommand is a module in ``immunize.commands`` with a ``HELP`` line and ``main(argv)``;
they are discovered, not listed, so adding a command touches only its own module. Heavy imports
(torch, transformers) happen inside commands, keeping ``immunize --help`` instant.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator

from immunize.errors import ImmunizeError, Interrupted


def _commands() -> dict[str, str]:
    import immunize.commands as package

    return {m.name.replace("_", "-"): f"immunize.commands.{m.name}"
            for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}


def _usage(commands: dict[str, str]) -> str:
    lines = ["usage: immunize COMMAND [options]   (immunize COMMAND --help for a command's options)", "",
             "commands:"]
    for name, module in sorted(commands.items()):
        lines.append(f"  {name:<10} {importlib.import_module(module).HELP}")
    return "\n".join(lines)


@contextlib.contextmanager
def _one_output_per_job() -> Iterator[None]:
    """In a launched job only the main process prints results and progress (each rank runs the
    same command); every rank keeps its stderr, so a failure on any rank is seen."""
    from immunize.distributed import is_main

    if is_main():
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as quiet, contextlib.redirect_stdout(quiet):
        yield


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    if argv[0] == "--version":
        from immunize import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"immunize: unknown command {name!r} (known: {', '.join(sorted(commands))})", file=sys.stderr)
        return 2
    # Offline unless the user opted in to the hub; set before transformers is imported anywhere.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=os.environ.get("IMMUNIZE_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from immunize.config import COMMAND
        from immunize.distributed import use_cpu_when_no_gpu

        use_cpu_when_no_gpu()
        token = COMMAND.set(["immunize", name, *rest])
        try:
            with _one_output_per_job():
                return int(importlib.import_module(commands[name]).main(rest) or 0)
        finally:
            COMMAND.reset(token)
    except ImmunizeError as err:
        print(f"immunize {name}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"immunize {name}: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print(f"immunize {name}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
