"""Checks that an optional extra is installed before a command imports it."""

from __future__ import annotations

import importlib.util
import os
import sys


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit with code 2 and a one-line hint when any of `modules` is not importable."""
    missing = missing_modules(modules)
    if missing:
        print(f"{command}: needs the '{extra}' extra (missing: {', '.join(missing)}); "
              f"install it with: pip install 'llavao1-edge[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def run_guarded(prog: str, func, errors: tuple[type[BaseException], ...], interrupted: str = "interrupted") -> int:
    """Run a command body: a user mistake (one of `errors`) is one line on stderr and exit code 1."""
    try:
        return func()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except errors as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
