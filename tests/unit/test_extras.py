"""Optional extras (issue 13.5): a feature whose extra is missing says which extra to install, in one line, and
only when it is used; the rest of the package works without it.

Absence is simulated in a fresh interpreter by a `sys.meta_path` finder that refuses the module, the way Python
reports a package that is not installed (ModuleNotFoundError); the real entry point or module then runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpfm_scale.errors import MissingExtraError
from gpfm_scale.extras import EXTRAS, install_hint, require

REPO = Path(__file__).resolve().parents[2]

_BLOCKER = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _run_without(blocked: set[str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_require_names_the_extra_and_returns_the_module_when_present():
    assert require("json", "train", "anything").__name__ == "json"
    with pytest.raises(MissingExtraError) as err:
        require("gpfm_no_such_module.sub", "survival", "the survival task")
    msg = str(err.value)
    assert msg == ("the survival task needs gpfm_no_such_module, which is not installed; install the 'survival' "
                   "extra: pip install 'gpfm-scale[survival]'")
    with pytest.raises(ValueError, match="unknown extra"):
        install_hint("nope")
    assert set(EXTRAS) == {"gpu", "train", "survival", "cloud"}


def test_pretrain_without_deepspeed_exits_2_naming_the_train_extra(tmp_path):
    """The real CLI: one line on stderr, exit 2, before Ray starts; importing the train stage needs no DeepSpeed."""
    proc = _run_without({"deepspeed"}, """
        import gpfm_scale.train.stage, gpfm_scale.train.worker  # importable without the extra
        from gpfm_scale.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "pretrain", "--shards", str(tmp_path / "none-{000000..000001}.tar"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["gpfm-scale pretrain: error: pretraining needs deepspeed, which is not installed; install the "
                     "'train' extra: pip install 'gpfm-scale[train]'"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_evaluation_without_sksurv_imports_and_survival_names_the_survival_extra():
    """Core evaluation (stage, report, plots) imports without scikit-survival; the c-index, the survival fit and
    the Kaplan-Meier plot each raise MissingExtraError naming `survival`."""
    proc = _run_without({"sksurv"}, """
        import numpy as np
        import gpfm_scale.evaluate.stage, gpfm_scale.evaluate.report  # core evaluation imports
        from gpfm_scale.errors import MissingExtraError
        from gpfm_scale.evaluate.plots import plot_kaplan_meier
        from gpfm_scale.evaluate.survival import concordance_index, fit_survival

        calls = [lambda: concordance_index(np.array([1.0, 2.0]), np.array([1, 0]), np.array([0.5, 0.1])),
                 lambda: fit_survival(None, None, None, None, None, 0),
                 lambda: plot_kaplan_meier(np.ones(4), np.ones(4), np.arange(4.0), "km.png")]
        for call in calls:
            try:
                call()
            except MissingExtraError as err:
                print(err)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr
    for line, feature in zip(lines, ("the survival c-index", "the survival task", "the Kaplan-Meier plot"),
                             strict=True):
        assert line == (f"{feature} needs sksurv, which is not installed; install the 'survival' extra: "
                        "pip install 'gpfm-scale[survival]'")


def test_slides_without_cucim_go_to_the_next_reader_with_a_warning_naming_the_gpu_extra(real_svs):
    """Default readers: the slide opens with OpenSlide (recorded as the reader) and the missing cuCIM is said
    once; asked for cuCIM alone, the slide fails with that reason."""
    proc = _run_without({"cucim"}, """
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from gpfm_scale.errors import SlideReadError
        from gpfm_scale.slides.open import open_slide

        for _ in range(2):
            reader = open_slide(sys.argv[1])
            print("READER", reader.name)
            reader.close()
        try:
            open_slide(sys.argv[1], readers=("cucim",))
        except SlideReadError as err:
            print("ERROR", err)
    """, str(real_svs))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("READER openslide") == 2, proc.stdout
    hint = ("the cucim reader needs cucim, which is not installed; install the 'gpu' extra: "
            "pip install 'gpfm-scale[gpu]'")
    assert f"ERROR {real_svs}: no reader could open it: cucim: {hint}" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [f"WARNING cucim: {hint}; slides are read by the next reader in the readers list"]


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    """An extra that is installed but fails to import (a missing shared library) is not called "not installed"."""
    (tmp_path / "gpfm_broken_extra.py").write_text('raise ImportError("libcuda.so.1: cannot open shared object")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as err:
        require("gpfm_broken_extra", "gpu", "the cucim reader")
    assert str(err.value) == ("the cucim reader needs gpfm_broken_extra, which does not import (libcuda.so.1: cannot "
                              "open shared object); install the 'gpu' extra: pip install 'gpfm-scale[gpu]'")
