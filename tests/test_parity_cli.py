"""The parity command (iepkt_tf/parity.py) on the shipped fixtures and on damaged copies."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from iepkt_tf import parity
from tests.conftest import FIXTURES

REPO = pathlib.Path(__file__).resolve().parent.parent
FINAL = re.compile(r"^(\d+) passed, (\d+) failed$")


def run_main(directory, capsys):
    rc = parity.main(["--fixtures", str(directory)])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip().splitlines()


def copy(names, dst):
    for name in names:
        shutil.copy(FIXTURES / name, dst / name)


def rewrite(src, dst, change):
    """Write ``dst`` with the arrays of fixture ``src`` after ``change(dict)``."""
    with np.load(FIXTURES / src) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    np.savez_compressed(dst, **arrays)


def test_all_shipped_fixtures_pass():
    rows = parity.run_parity(FIXTURES)
    failed = [r.format() for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    stems = {r.name.split(":")[0] for r in rows}
    for path in FIXTURES.glob("*.npz"):     # every fixture file contributes rows
        assert path.stem in stems, path.name
    names = {r.name for r in rows}
    # Each kind of check ran, including the full distiller and the network.
    for probe in ("g_eki_case1:out/dist", "g_eki_case2:grad/dist2/student2", "h_wresnet:out/train/logits",
                  "c_stacked_pca:t4/p2/state_after/V", "d_mpnn:m2/train/M", "e_mhgd:m1/est_out"):
        assert probe in names, probe
    zero = [r for r in rows if r.name.endswith("Attention/Rbn/beta") and "grad/" in r.name]
    assert zero and all(r.mode == "abs" and r.tol == parity.ZERO_GRAD_ABS_TOL for r in zero)


def test_final_line_and_exit_status(tmp_path, capsys):
    copy(["b_plane_mapping.npz", "f_kld.npz"], tmp_path)
    rc, out, err = run_main(tmp_path, capsys)
    assert rc == 0 and not err
    m = FINAL.match(out[-1])
    assert m, out[-1]
    rows = parity.run_parity(tmp_path)
    assert out[-1] == f"{len(rows)} passed, 0 failed"
    assert sum(line.endswith("PASS") for line in out) == len(rows)


def test_corrupted_file_is_reported_by_name(tmp_path, capsys):
    copy(["f_kld.npz"], tmp_path)
    data = (FIXTURES / "b_plane_mapping.npz").read_bytes()
    (tmp_path / "b_plane_mapping.npz").write_bytes(data[: len(data) // 2])
    rc, out, err = run_main(tmp_path, capsys)
    assert rc != 0
    assert len(err) == 1 and "b_plane_mapping.npz" in err[0]
    assert FINAL.match(out[-1])                      # the readable file was still checked
    with pytest.raises(parity.FixtureError, match="b_plane_mapping.npz"):
        parity.run_parity(tmp_path)


def test_corrupted_file_exit_status_of_the_module(tmp_path):
    data = (FIXTURES / "f_kld.npz").read_bytes()
    (tmp_path / "f_kld.npz").write_bytes(data[:100])
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "iepkt_tf.parity", "--fixtures", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("parity:")]
    assert len(lines) == 1 and "f_kld.npz" in lines[0]


def test_perturbed_reference_gives_a_fail_row(tmp_path, capsys):
    def perturb(a):
        a["c1/kld"] = a["c1/kld"] * np.float32(1.001)   # 1e-3 relative > the 1e-4 forward tolerance
    rewrite("f_kld.npz", tmp_path / "f_kld.npz", perturb)
    rc, out, _ = run_main(tmp_path, capsys)
    assert rc == 1
    failing = [line for line in out if line.endswith("FAIL")]
    assert len(failing) == 1 and failing[0].startswith("f_kld:c1/kld ")
    n, m = map(int, FINAL.match(out[-1]).groups())
    assert m == 1 and n == len(out) - 3   # header, rows, final line


def test_state_tolerance_applies_to_after_update(tmp_path, capsys):
    key = "after_update/Distillation/EKI/EKI_module1/MPNN/MPNN/Message/Mbn/moving_variance"

    def perturb(a):
        a[key] = a[key] + np.float32(5e-3) * np.abs(a[key]).max()
    rewrite("d_mpnn.npz", tmp_path / "d_mpnn.npz", perturb)
    rc, out, _ = run_main(tmp_path, capsys)
    assert rc == 1
    assert [line.split()[0] for line in out if line.endswith("FAIL")] == [f"d_mpnn:{key}"]


def test_missing_key_and_unknown_name(tmp_path):
    rewrite("f_kld.npz", tmp_path / "f_kld.npz", lambda a: a.pop("c0/Y"))
    with pytest.raises(parity.FixtureError, match=r"f_kld\.npz: missing key 'c0/Y'"):
        parity.run_parity(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(FIXTURES / "f_kld.npz", other / "z_something.npz")
    with pytest.raises(parity.FixtureError, match="z_something.npz: unknown fixture name"):
        parity.run_parity(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(parity.FixtureError, match="no fixture files"):
        parity.run_parity(tmp_path / "empty")
    with pytest.raises(parity.FixtureError, match="not a directory"):
        parity.run_parity(tmp_path / "nothing_here")


def test_compare_semantics():
    ok = parity.compare("x", [1.0, 2.00005], [1.0, 2.0], 1e-4)
    assert ok.passed and ok.rel_err == pytest.approx(2.5e-5, rel=1e-3)
    assert not parity.compare("x", [1.0, 2.001], [1.0, 2.0], 1e-4).passed
    assert parity.compare("x", [0.0, 5e-8], [0.0, 0.0], 1e-7, mode="abs").passed
    assert not parity.compare("x", [0.0, 5e-7], [0.0, 0.0], 1e-7, mode="abs").passed
    assert not parity.compare("x", [1.0], [1.0, 1.0], 1.0).passed            # shape
    assert not parity.compare("x", [np.nan], [1.0], 1.0).passed              # non-finite
    assert not parity.compare_equal("b", True, False).passed


# ------------------------------------------------------------------ flags (iepkt_tf/cli.py)

def test_help_lists_the_flags(capsys):
    assert parity.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(parity.__doc__.strip().splitlines()[0])
    assert "--fixtures" in out and "--[no]failures_only" in out


@pytest.mark.parametrize("argv, part", [
    ([], "--fixtures"),                                     # the required flag
    (["--fixtures"], "--fixtures"),                         # without its value
    (["--fixtures", str(FIXTURES), "--bogus"], "bogus"),
    (["--fixtures", str(FIXTURES), "extra"], "unexpected arguments"),
])
def test_bad_flags_are_one_line_errors(argv, part, capsys):
    assert parity.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parity: error: ") and part in lines[0], err
    assert out == ""


def test_failures_only_prints_only_the_failing_rows(tmp_path, capsys):
    def perturb(a):
        a["c1/kld"] = a["c1/kld"] * np.float32(1.001)
    rewrite("f_kld.npz", tmp_path / "f_kld.npz", perturb)
    assert parity.main(["--fixtures", str(tmp_path), "--failures_only"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[1].startswith("f_kld:c1/kld ") and out[1].endswith("FAIL")
    n, m = map(int, FINAL.match(out[-1]).groups())
    assert m == 1 and n > 0
