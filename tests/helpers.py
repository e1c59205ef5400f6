"""Helpers for tests that run a script's main() in the test process."""
import contextlib
import io

import pytest

from common.io import run_cli


def call(main, *argv):
    """main(argv) as the script would run it: (its return value, what it printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = main([str(a) for a in argv])
    return result, buf.getvalue()


def cli_error(main, *argv, capsys) -> str:
    """main(argv) through run_cli, as the script runs it: asserts exit status 2 and exactly one line
    on stderr, and returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]
