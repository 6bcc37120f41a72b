"""The interactive menu, driven through stdin."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from wantrainer import menu
from wantrainer.errors import UserError


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "configs" / "mine").mkdir(parents=True)
    (tmp_path / "configs" / "a.toml").write_text("seed = 1\n", encoding="utf-8")
    (tmp_path / "configs" / "mine" / "b.toml").write_text('learning_rat = 1\n', encoding="utf-8")
    (tmp_path / "configs" / "notes.txt").write_text("not a config", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_menu(answers: str) -> tuple[int, str]:
    out = io.StringIO()
    code = menu.run(None, stdin=io.StringIO(answers), stdout=out)
    return code, out.getvalue()


def test_lists_configs_recursively_and_operations(project):
    code, out = run_menu("q\n")
    assert code == 0
    assert "1. configs/a.toml" in out and "2. configs/mine/b.toml" in out and "notes.txt" not in out
    assert menu.find_configs(Path("configs")) == [Path("configs/a.toml"), Path("configs/mine/b.toml")]


def test_runs_the_chosen_operation(project, capsys):
    code, out = run_menu("1\n1\n")  # a.toml, validate
    assert code == 2  # a.toml names no model or dataset: not ready for train
    assert "validate" in out and "> wantrainer validate --config configs/a.toml" in out
    assert "train: not ready" in capsys.readouterr().out


def test_bad_choices_are_asked_again_and_errors_exit_2(project, capsys):
    code, out = run_menu("7\nx\n2\n1\n")  # out of range, not a number, then b.toml, validate
    assert "'7' is not a choice" in out and "'x' is not a choice" in out
    assert code == 2
    assert "did you mean `learning_rate`?" in capsys.readouterr().err


def test_end_of_input_quits(project):
    assert run_menu("1\n")[0] == 0


def test_only_installed_operations_are_offered():
    names = [name for name, _ in menu.available_operations()]
    assert names[0] == "validate"
    assert set(names) <= {name for name, _ in menu.OPERATIONS}


def test_no_configs_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no .toml config in"):
        run_menu("")


def test_configs_of_the_working_folder_first_and_no_template(project, capsys):
    from wantrainer.config.template import render_template

    (project / "here.toml").write_text("seed = 3\n", encoding="utf-8")
    (project / "configs" / "examples").mkdir()
    (project / "configs" / "examples" / "full_config_template.toml").write_text(render_template(), encoding="utf-8")
    code, out = run_menu("q\n")
    assert "1. here.toml" in out and "2. configs/a.toml" in out and "full_config_template" not in out


def test_returns_to_the_list_after_an_operation(project, capsys):
    code, out = run_menu("1\n1\n1\n1\nq\n")  # validate a.toml twice, then quit
    assert code == 2  # the last operation's exit code (a.toml names no model, so train could not start)
    assert out.count("> wantrainer validate --config configs/a.toml") == 2
    assert out.count("Config files:") == 3 and out.count("(exit code 2)") == 2
    assert capsys.readouterr().out.count("values that differ from the defaults:") == 2
