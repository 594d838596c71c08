"""``npas-tvm``: the command line.

User mistakes (:class:`~npas_tvm.errors.NpasError`) print one line and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from npas_tvm import __version__
from npas_tvm.commands import COMMANDS
from npas_tvm.errors import NpasError


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show full tracebacks for errors")
    parser = argparse.ArgumentParser(
        prog="npas-tvm", parents=[common],
        description="Compiler-aware pruning and sparse code generation for mobile DNNs on TVM.")
    parser.add_argument("--version", action="version", version=f"npas-tvm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"npas_tvm.commands.{name}").register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    from npas_tvm.runtime import ensure_thread_env

    ensure_thread_env()  # before TVM's runtime starts its thread pool
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return int(args.func(args) or 0)
    except NpasError as err:
        if args.debug:
            raise
        print(f"npas-tvm: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("npas-tvm: interrupted", file=sys.stderr)
        return 130


class _LowerCaseLevel(logging.Formatter):
    def format(self, record):
        record.levelname = record.levelname.lower()
        return super().format(record)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so a swapped or closed stream
    (pytest's capture, a notebook) never swallows a warning."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging() -> None:
    """npas-tvm's warnings (a pruned layer left dense...) as ``npas-tvm: warning: ...``.

    The logger keeps propagating, so an application's (or pytest's) root handlers
    still see every record; the CLI's own handler is added once.
    """
    log = logging.getLogger("npas_tvm")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(_LowerCaseLevel("npas-tvm: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)

if __name__ == "__main__":
    raise SystemExit(main())
