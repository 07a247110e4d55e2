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
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `verifily`: what it can do, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if not getattr(sys.unraisablehook, "redelivers_interrupts", False):
        sys.unraisablehook = redeliver_lost_interrupts(sys.unraisablehook)
    try:
        code = handler(args.handler)(args)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, inside the handler below, not at exit
        return code
    except BrokenPipeError:
        return closed_stdout()
    except VerifilyError as err:
        return report(err)
    except OSError as err:
        user_error = translate_os_error(err)
        if user_error is None:
            raise
        return report(user_error)
    except KeyboardInterrupt:
        forget_unhandled_keyboard_interrupt()
        print("interrupted", file=sys.stderr)
        return 130


def closed_stdout() -> int:
    """The reader of stdout went away (``verifily runs list | head``): stop quietly, as a command killed by SIGPIPE.

    stdout is pointed at /dev/null so that Python's final flush does not raise again at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what the shell reports for `cat big | head`


def redeliver_lost_interrupts(previous: Callable) -> Callable:
    """An unraisable hook that turns a Ctrl-C Python had to drop back into a Ctrl-C.

    A SIGINT that lands inside a callback Python cannot raise from (a weakref callback of importlib's
    module locks during an import, a ``__del__``) is printed as "Exception ignored in ..." and lost, and the
    run would go on. The hook sends SIGINT to the main thread again, from a helper thread once the hook has
    returned (raised inside the hook, it would be lost the same way); any other unraisable goes on to
    ``previous``."""
    import signal
    import threading
    import time

    def resend(main_thread: int) -> None:
        time.sleep(0.05)
        signal.pthread_kill(main_thread, signal.SIGINT)

    def hook(unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:
            previous(unraisable)
            return
        threading.Thread(target=resend, args=(threading.main_thread().ident,), daemon=True).start()

    hook.redelivers_interrupts = True
    return hook


def forget_unhandled_keyboard_interrupt() -> None:
    """Let ``sys.exit(130)`` stand after a caught Ctrl-C.

    CPython marks a KeyboardInterrupt that leaves a *string* ``exec``/``eval`` (``dataclasses`` builds its
    methods that way, so an import under way when Ctrl-C lands is enough) as unhandled, even once a caller
    caught it; under ``python -m`` the interpreter then ends itself with SIGINT (exit -2) instead of the
    code we return. Every string ``exec`` clears that mark when it starts, so an empty one forgets it.
    """
    exec("pass", {})


if __name__ == "__main__":
    sys.exit(main())
