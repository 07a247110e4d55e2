"""Ctrl-C's exit code under ``python -m``, made deterministic (the CI flake of 2026-12-02: exit -2, not 130).

A SIGINT that lands while a string ``exec`` runs (``dataclasses`` builds methods that way during an import)
leaves CPython's "unhandled KeyboardInterrupt" mark set even though ``cli.main`` catches it; under ``-m`` the
interpreter then killed itself with SIGINT after printing "interrupted". The command below raises inside a
string ``exec`` through the real ``main``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import cli_env


def default_sigint() -> None:
    """SIGINT's default action in the child, as a terminal gives it (a background test run inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["exec", "eval"])
def test_ctrl_c_inside_a_string_exec_still_exits_130(tmp_path, how):
    (tmp_path / "interrupted_cli.py").write_text(textwrap.dedent(f"""
        import sys
        from verifily_train.cli import main as cli

        def interrupted(args):
            {how}("(_ for _ in ()).throw(KeyboardInterrupt)", {{}})

        cli.handler = lambda name: interrupted
        sys.exit(cli.main(["runs", "list"]))
    """))
    done = subprocess.run([sys.executable, "-m", "interrupted_cli"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_a_ctrl_c_lost_in_a_weakref_callback_still_stops_the_command(tmp_path):
    """Python cannot raise from a weakref callback; the SIGINT that lands there used to be printed as
    "Exception ignored" and the run went on. It is re-delivered: the command stops, 130, one line."""
    (tmp_path / "lost_cli.py").write_text(textwrap.dedent("""
        import sys, time, weakref
        from verifily_train.cli import main as cli

        class Thing:
            pass

        def interrupted(args):
            def callback(ref):
                raise KeyboardInterrupt
            thing = Thing()
            ref = weakref.ref(thing, callback)
            del thing
            time.sleep(30)
            print("the command ran on")
            return 0

        cli.handler = lambda name: interrupted
        sys.exit(cli.main(["runs", "list"]))
    """))
    done = subprocess.run([sys.executable, "-m", "lost_cli"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")
