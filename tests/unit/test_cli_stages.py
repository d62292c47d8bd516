"""The CLI's stage table: every option of a stage either sets a real config key or is a run input handed to the
stage's run function; --workers sets the key each stage's table entry names."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from gpfm_scale.cli import STAGES, _ConfigOption, build_parser, config_defaults, main

COMMON = {"help", "config", "set", "print_config", "log_level"}


@pytest.mark.parametrize("cmd", list(STAGES))
def test_each_option_sets_a_config_key_or_is_a_run_input(cmd):
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    keys = config_defaults(cmd)
    for action in sub._actions:
        if isinstance(action, _ConfigOption):
            assert action.dest in keys, (cmd, action.option_strings, "sets no key of the config")
            assert action.dest not in STAGES[cmd].inputs, (cmd, action.dest)
        else:
            assert action.dest in COMMON or action.dest in STAGES[cmd].inputs, (cmd, action.option_strings)
    for flag in STAGES[cmd].required:
        assert flag[2:].replace("-", "_") in STAGES[cmd].inputs, (cmd, flag)


@pytest.mark.parametrize("cmd", [cmd for cmd, stage in STAGES.items() if stage.workers])
def test_workers_sets_the_key_of_its_stage(cmd, capsys):
    key = STAGES[cmd].workers[0]
    assert main([cmd, "--workers", "3", "--print-config"]) == 0
    node = yaml.safe_load(capsys.readouterr().out)
    for part in key.split("."):
        node = node[part]
    assert node == 3
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices[cmd].format_help().split())
    assert f"Sets {key}:" in help_text


calls: list[tuple] = []


def fake_evaluate(cfg, features, tasks, out, labels, command):
    calls.append((cfg.seed, cfg.bootstrap, features, tasks, out, labels, command))
    return "the result"


def test_run_inputs_reach_run_in_order_and_the_summary_gives_the_exit_code(monkeypatch, capsys):
    summaries = []
    entry = dataclasses.replace(STAGES["evaluate"], run=f"{__name__}:fake_evaluate",
                                summary=lambda result: summaries.append(result) or 5)
    monkeypatch.setitem(STAGES, "evaluate", entry)
    calls.clear()
    argv = ["evaluate", "--features", "a", "--features", "b", "--task", "knn, abmil", "--task", "survival",
            "--out", "o", "--seed", "3", "--set", "bootstrap=4"]
    assert main(argv) == 5
    assert calls == [(3, 4, ["a", "b"], ["knn", "abmil", "survival"], "o", None,
                      "gpfm-scale evaluate --features a --features b --task 'knn, abmil' --task survival --out o "
                      "--seed 3 --set bootstrap=4")]
    assert summaries == ["the result"]
