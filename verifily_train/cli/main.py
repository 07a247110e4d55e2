"""``verifily``: parse the command line (cli/parser.py), run the command's handler, turn user errors into one line.

A ``VerifilyError`` (and an OS error that ``errors.translate_os_error`` names, such as a full disk) is printed
as one ``error:`` line per problem with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, List, Optional

from verifily_train.cli.parser import build_parser
from verifily_train.errors import VerifilyError, translate_os_error


def handler(name: str) -> Callable:
    """The function ``"<module>:<function>"`` names in ``verifily_train.cli`` (imported now, not at start-up)."""
    module, function = name.split(":")
    return getattr(importlib.import_module(f"verifily_train.cli.{module}"), function)


def report(err: VerifilyError) -> int:
    """Print a user error (every problem of a preflight) on stderr; its exit code."""
    for line in err.lines():
        print(f"error: {line}", file=sys.stderr)
    return err.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return handler(args.handler)(args)
    except VerifilyError as err:
        return report(err)
    except OSError as err:
        user_error = translate_os_error(err)
        if user_error is None:
            raise
        return report(user_error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
