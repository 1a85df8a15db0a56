"""pyproject.toml: `pip install .` puts the packages and train_w_distill.py where Python finds them,
and the tools then run from any directory (here: installed with --target into a temporary folder,
without dependencies or build isolation, and run from another folder)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--target", str(target), REPO],
                         cwd=build, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PIP_NO_INPUT="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    return target


def run_from_elsewhere(site, cwd, *args):
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_install_holds_every_package_and_the_script(site):
    names = set(os.listdir(site))
    assert {"iepkt_tf", "nets", "op_util", "dataloader", "train_w_distill.py"} <= names
    assert os.path.isfile(os.path.join(site, "iepkt_tf", "distillers", "iep.py"))


def test_tools_run_from_another_directory(site, tmp_path):
    res = run_from_elsewhere(site, tmp_path, "-m", "iepkt_tf.parity", "--help")
    assert res.returncode == 0 and "--fixtures" in res.stdout, res.stderr
    res = run_from_elsewhere(site, tmp_path, "-c", "import iepkt_tf, train_w_distill; "
                             "print(iepkt_tf.__file__)")
    assert res.returncode == 0 and res.stdout.startswith(str(site)), res.stdout + res.stderr
    # the runner finds the installed training script (it runs it from the install folder)
    res = run_from_elsewhere(site, tmp_path, "-m", "iepkt_tf.experiments", "--preset=tiny",
                             f"--out_dir={tmp_path / 'grid'}", "--dry_run")
    assert res.returncode == 0, res.stderr
    assert "train_w_distill.py" in res.stdout
    from iepkt_tf import experiments
    assert os.path.isfile(os.path.join(site, experiments.TRAIN_SCRIPT))
