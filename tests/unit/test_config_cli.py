"""Configs refuse unknown or invalid keys by name; the CLI maps options onto keys and exits with clear codes."""

import pytest
import yaml

from gpfm_scale.cli import main
from gpfm_scale.config import load_config
from gpfm_scale.errors import ConfigError
from gpfm_scale.tiling.config import TilingConfig


def test_yaml_diff_over_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid:\n  tile_px: 256\nworkers: 3\n")
    cfg = load_config(TilingConfig, path, {"grid.target_mpp": 0.5, "grid.max_tiles_per_slide": None})
    assert (cfg.grid.tile_px, cfg.grid.target_mpp, cfg.workers) == (256, 0.5, 3)
    assert cfg.grid.max_tiles_per_slide is None
    assert cfg.grid.min_tissue_fraction == 0.25  # untouched default


@pytest.mark.parametrize("text,match", [
    ("grid:\n  tile_pixels: 256\n", "unknown key 'grid.tile_pixels'"),
    ("grid:\n  tile_px: -1\n", "invalid value for 'grid.tile_px'"),
    ("readers: [cucim, pillow]\n", "invalid value for 'readers.1'"),
    ("grid:\n  target_mpp: 0.5\n  target_magnification: 20\n", "not both"),
    ("- a list\n", "top level must be a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(TilingConfig, path)


def test_cli_print_config_and_errors(tmp_path, capsys):
    assert main(["tile", "--slides", "x", "--out", "y", "--tile-px", "128", "--max-tiles", "0", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["grid"]["tile_px"] == 128 and printed["grid"]["max_tiles_per_slide"] is None
    assert main(["tile", "--slides", "x", "--out", "y", "--set", "grid.nope=1"]) == 2
    assert "unknown key 'grid.nope'" in capsys.readouterr().err
    assert main(["tile", "--slides", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gpfm-scale {version('gpfm-scale')}"
    proc = subprocess.run([sys.executable, "-m", "gpfm_scale", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gpfm-scale {version('gpfm-scale')}"


@pytest.mark.parametrize("cmd", ["tile", "mix", "embed", "evaluate"])
def test_print_config_needs_no_run_inputs_but_a_run_does(cmd, capsys):
    from gpfm_scale.cli import STAGES

    assert main([cmd, "--print-config"]) == 0
    assert isinstance(yaml.safe_load(capsys.readouterr().out), dict)
    assert main([cmd]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(flag in err for flag in STAGES[cmd].required), err


def test_each_set_example_names_a_key_of_its_own_config(capsys):
    """The `--set` help of each sub-command shows a key that exists there (one example for all named a tiling key)."""
    from gpfm_scale.cli import STAGES, build_parser

    parser = build_parser()
    for cmd, example in ((cmd, stage.set_example) for cmd, stage in STAGES.items()):
        key, _, value = example.partition("=")
        assert main([cmd, "--set", example, "--print-config"]) == 0, (cmd, capsys.readouterr().err)
        printed = yaml.safe_load(capsys.readouterr().out)
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), (cmd, key, node)
        sub = parser._subparsers._group_actions[0].choices[cmd]
        assert f"--set {example}" in " ".join(sub.format_help().split())


@pytest.mark.parametrize("cmd", ["tile", "mix", "pretrain", "embed", "evaluate"])
def test_help_shows_each_options_real_default(cmd):
    """Options that set a config key show the config model's default (argparse's own is None); others argparse's."""
    from gpfm_scale.cli import build_parser, config_defaults

    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    text = " ".join(sub.format_help().split())
    defaults = config_defaults(cmd)
    shown = 0
    for action in sub._actions:
        value = defaults.get(action.dest) if action.default is None else action.default
        if not action.option_strings or value is None or value is False or value == [] or action.dest == "help":
            continue
        help_text = " ".join((action.help or "").split())
        assert f"{help_text} (default: {value})" in text, (cmd, action.dest, value)
        shown += 1
    assert shown >= 1
