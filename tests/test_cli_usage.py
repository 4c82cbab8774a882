"""CLI usage errors print the usage and exit 2, never a traceback."""

import pytest

from efflax import cli


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["launch", "-n", "2"], "no command to run"),
        (["launch", "-n", "2", "--"], "no command to run"),
        (["launch", "--", "true"], "-n/--num-processes"),
        (["launch", "-n", "0", "--", "true"], "-n must be at least 1"),
        (["launch", "-n", "two", "--", "true"], "invalid int value"),
        (["launch", "-n", "1", "--cpu-devices", "0", "--", "true"], "--cpu-devices must be"),
        (["launch", "-n", "1", "--timeout", "-1", "--", "true"], "--timeout must be"),
        ([], "required: command"),
        (["frob"], "invalid choice"),
        (["reproduce", "--jobs", "x"], "invalid int value"),
    ],
)
def test_usage_errors_print_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: efflax")
    assert message in err
    assert "Traceback" not in err


def test_launch_runs_a_command():
    assert cli.main(["launch", "-n", "1", "--", "true"]) == 0
