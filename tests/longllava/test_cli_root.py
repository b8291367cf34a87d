"""The composition root: launcher arguments and the one-line error contract."""

from __future__ import annotations

import os

import pytest

from longllava import cli
from longllava.errors import UserInputError


@pytest.mark.parametrize("argv", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]])
def test_deepspeed_local_rank_is_taken_out_of_the_arguments(argv, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so the value set below is undone afterwards
    monkeypatch.delenv("LOCAL_RANK")
    kept = cli._take_local_rank([*argv, "plan", "--preset", "tiny"])
    assert kept == ["plan", "--preset", "tiny"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    def fail(_args):
        raise UserInputError("model folder /nope does not exist: pass a local model folder or 'demo'")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=fail)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: model folder /nope does not exist: pass a local model folder or 'demo'"


def test_no_command_prints_help_and_exit_code_2(capsys):
    assert cli.main([]) == 2
    assert "usage: longllava" in capsys.readouterr().out
