"""``keras.callbacks.BackupAndRestore`` around ``DistillationModel.fit``: a run killed with SIGKILL
in the middle of a main-phase epoch and run again ends with exactly the state of an uninterrupted
run (student with its BN statistics, IEP's module and incremental-PCA state, the optimiser's
momentum and step counter). The run is tests/keras_backup_case.py in subprocesses."""
import os
import signal
import subprocess
import sys

import numpy as np

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_backup_case.py")


def _run(out, backup, kill_at=None):
    """Run the case; with ``kill_at=(epoch, batch)`` SIGKILL it after that step. Returns the
    STEP lines seen."""
    proc = subprocess.Popen([sys.executable, CASE, str(out), str(backup)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stdout:
            if line.startswith("STEP"):
                seen.append(tuple(int(x) for x in line.split()[1:]))
                if kill_at is not None and seen[-1] == kill_at:
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if kill_at is None:
        assert proc.returncode == 0
    else:
        assert proc.returncode == -signal.SIGKILL
    return seen


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    ref = _run(tmp_path / "ref.npz", tmp_path / "backup_ref")
    assert ref[-1] == (2, 3) and len(ref) == 12  # 3 epochs x 4 steps
    killed = _run(tmp_path / "got.npz", tmp_path / "backup", kill_at=(1, 1))
    assert killed[-1] == (1, 1) and not os.path.exists(tmp_path / "got.npz")
    assert os.path.exists(tmp_path / "backup" / "latest.weights.h5")  # saved after epoch 0
    resumed = _run(tmp_path / "got.npz", tmp_path / "backup")
    assert resumed[0] == (1, 0) and resumed[-1] == (2, 3)  # epoch 1 again from its first batch
    want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "got.npz")
    assert sorted(want.files) == sorted(got.files)
    assert any("ipca" in n.lower() or "pca" in n.lower() for n in want.files), want.files
    for n in want.files:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
