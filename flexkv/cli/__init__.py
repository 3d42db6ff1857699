"""The ``flexkv`` command: ``flexkv serve | stats | check | keygen``.

Each subcommand is a module here with ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
code); ``main`` dispatches through :data:`SUBCOMMANDS`. ``keygen`` is the slot for
``flexkv.cli.keygen`` (the CurveZMQ key generator of ``flexkv.security``): it is listed only once
that module exists. The top layer: nothing imports this package.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# name -> one-line help; modules flexkv.cli.<name>
SUBCOMMANDS = {
    "serve": "run a flexkv server in the foreground until Ctrl-C",
    "stats": "show a running server's pools, hit rates, tasks, clients and workers",
    "check": "check what this machine offers flexkv (CUDA, io_uring, O_DIRECT, /dev/shm, redis)",
    "keygen": "generate CurveZMQ keys for non-loopback endpoints",
}
OPTIONAL = {"keygen"}  # present once its module is (flexkv.security)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"flexkv.cli.{name}")
    except ModuleNotFoundError as e:
        if name in OPTIONAL and e.name in (f"flexkv.cli.{name}", "flexkv.security"):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexkv", description="flexkv: a KV-cache manager for LLM engines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0] if module.__doc__
                           else help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args._module.run(args)
    return code
