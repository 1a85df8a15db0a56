"""iepkt_tf.experiments: the resumable grid runner (a subprocess, on the tiny preset), its tables.

One tiny grid (teacher + None/IEP x rate 0.5 x seeds 0, 1) is run in two invocations, the first
stopped by --max_runs, and shared by the tests (module fixture). Whole file: about 2 minutes on 2
CPU cores, nearly all of it the tiny training runs.
"""
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from iepkt_tf import experiments as ex
from iepkt_tf.mat_io import load_mat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = ["--preset=tiny", "--variants=None,IEP", "--rates=0.5", "--seeds=0,1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "iepkt_tf.experiments", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def read_rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def val_acc(run_dir):
    return load_mat(os.path.join(run_dir, "log.mat"))["validation_acc"].ravel()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grid"))
    first = cli(*GRID, f"--out_dir={out}", "--max_runs=2")
    done = [os.path.join(out, "teacher"), os.path.join(out, "None", "r0.5_s0")]
    params = [os.path.join(d, "train_params.mat") for d in done]
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read())
              for p in params if os.path.isfile(p)}
    rows_first = read_rows(out) if os.path.isfile(os.path.join(out, "results.csv")) else []
    second = cli(*GRID, f"--out_dir={out}")
    return dict(out=out, first=first, second=second, before=before, params=params,
                rows_first=rows_first)


# ------------------------------------------------------------------ the grid, stopped and resumed

def test_max_runs_stops_with_partial_tables(grid):
    first = grid["first"]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped after 2 run(s) (--max_runs)" in first.stdout
    assert [(r["variant"], r["rate"], r["seed"]) for r in grid["rows_first"]] == [
        ("teacher", "1", "0"), ("None", "0.5", "0")]
    assert sorted(grid["before"]) == sorted(grid["params"])


def test_second_invocation_skips_finished_runs_and_completes(grid):
    second = grid["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    lines = second.stdout.splitlines()
    assert any(re.match(r"\[1/5\] teacher 1 0 -> \d+\.\d\d \(skipped", ln) for ln in lines)
    assert any(re.match(r"\[2/5\] None 0.5 0 -> \d+\.\d\d \(skipped", ln) for ln in lines)
    for path, (mtime, data) in grid["before"].items():
        assert os.stat(path).st_mtime_ns == mtime
        assert open(path, "rb").read() == data
    # each skipped run was launched once (one header line in its console.log)
    with open(os.path.join(grid["out"], "teacher", "console.log")) as f:
        assert sum(ln.startswith("# ") for ln in f) == 1
    # progress line of a run of this invocation, with the ETA
    assert any(re.fullmatch(r"\[5/5\] IEP 0.5 1 -> \d+\.\d\d \(\d+\.\d s\), ETA 00:00:00", ln)
               for ln in lines), second.stdout


def test_csv_has_one_row_per_run_matching_the_logs(grid):
    out = grid["out"]
    rows = read_rows(out)
    assert list(rows[0]) == list(ex.CSV_FIELDS)
    assert [(r["variant"], r["rate"], r["seed"]) for r in rows] == [
        ("teacher", "1", "0"), ("None", "0.5", "0"), ("None", "0.5", "1"),
        ("IEP", "0.5", "0"), ("IEP", "0.5", "1")]
    for r in rows:
        acc = val_acc(os.path.join(out, r["train_dir"]))
        assert float(r["final_acc"]) == pytest.approx(acc[-1], abs=1e-4)
        assert float(r["best_acc"]) == pytest.approx(acc.max(), abs=1e-4)
        assert int(r["epochs"]) == len(acc) == (2 if r["variant"] == "IEP" else 1)
        assert float(r["wall_s"]) > 0
    assert rows[3]["train_dir"] == "IEP/r0.5_s0"


def test_markdown_cells_match_the_csv(grid):
    rows = read_rows(grid["out"])
    with open(os.path.join(grid["out"], "results.md")) as f:
        md = f.read()
    assert (f"```\npython -m iepkt_tf.experiments --preset=tiny --out_dir={grid['out']} "
            f"--variants=None,IEP --rates=0.5 --seeds=0,1\n```") in md
    assert f"Teacher: {float(rows[0]['final_acc']):.2f} %" in md
    means = {}
    for variant in ("None", "IEP"):
        a, b = [float(r["final_acc"]) for r in rows if r["variant"] == variant]
        sd = float(np.std([a, b], ddof=1))
        means[variant] = (a + b) / 2
        assert f"| {variant} | {(a + b) / 2:.2f} ± {sd:.2f} ({a:.2f}, {b:.2f}) |" in md
    assert f"| IEP | {means['IEP'] - means['None']:+.2f} |" in md   # gain over None


def test_png_is_readable(grid):
    import matplotlib.image

    path = os.path.join(grid["out"], "results.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_summarize_only_rebuilds_the_same_files(grid):
    out = grid["out"]
    with open(os.path.join(out, "results.csv")) as f:
        csv_before = f.read()
    with open(os.path.join(out, "results.md")) as f:
        md_before = f.read()
    for name in ("results.csv", "results.md", "results.png"):
        os.remove(os.path.join(out, name))
    res = cli("--summarize_only", f"--out_dir={out}")
    assert res.returncode == 0, res.stderr
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == csv_before
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == md_before
    with open(os.path.join(out, "results.png"), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_summarize_keeps_csv_rows_of_removed_run_folders(grid, tmp_path):
    for name in ("results.csv", "grid.json"):
        shutil.copy(os.path.join(grid["out"], name), tmp_path / name)
    rows = ex.summarize(str(tmp_path))       # no run folders: every row comes from results.csv
    assert [r["train_dir"] for r in rows] == [r["train_dir"] for r in read_rows(grid["out"])]
    with open(tmp_path / "results.csv") as f, open(os.path.join(grid["out"], "results.csv")) as g:
        assert f.read() == g.read()


# ------------------------------------------------------------------ a killed run, a failed run

def test_killed_run_is_resumed_to_the_uninterrupted_result(grid, tmp_path):
    out = str(tmp_path / "killed")
    shutil.copytree(os.path.join(grid["out"], "teacher"), os.path.join(out, "teacher"))
    args = ["--preset=tiny", "--variants=IEP", "--rates=0.5", "--seeds=0", f"--out_dir={out}"]
    run_dir = os.path.join(out, "IEP", "r0.5_s0")
    killed = cli(*args, "--extra=--stop_after=1")      # stops after the initial epoch of 2
    assert killed.returncode == 1
    assert "IEP 0.5 0 -> FAILED (incomplete" in killed.stdout
    assert os.path.isdir(os.path.join(run_dir, "ckpt"))
    assert not os.path.exists(os.path.join(run_dir, "log.mat"))

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "IEP 0.5 0: resuming" in resumed.stdout
    with open(os.path.join(run_dir, "console.log")) as f:
        log = f.read()
    headers = [ln for ln in log.splitlines() if ln.startswith("# ")]
    assert len(headers) == 2 and headers[1].endswith(" --resume")
    assert "Resumed from" in log
    np.testing.assert_array_equal(val_acc(run_dir),
                                  val_acc(os.path.join(grid["out"], "IEP", "r0.5_s0")))
    assert ex.read_wall_time(run_dir) > 0
    assert '"invocations": 2' in open(os.path.join(run_dir, "run_time.json")).read()


def test_failed_runs_are_reported_and_the_grid_goes_on(tmp_path):
    out = str(tmp_path / "failing")
    res = cli("--preset=tiny", "--variants=None,IEP", "--rates=0.5", "--seeds=0",
              f"--out_dir={out}", "--extra=--learning_rate=-1")
    assert res.returncode == 1
    for variant, run in (("teacher", "teacher"), ("None", os.path.join("None", "r0.5_s0"))):
        log = os.path.join(out, run, "console.log")
        line = [ln for ln in res.stdout.splitlines() if f"] {variant} " in ln and "-> FAILED" in ln]
        assert len(line) == 1, res.stdout
        assert "(exit 2: train_w_distill.py: error: --learning_rate" in line[0]
        assert f"; log: {log}," in line[0]
        assert os.path.isfile(log)
    # the grid went on after the teacher failed: None ran; IEP, which needs the teacher, did not
    assert "IEP 0.5 0 -> FAILED (not started: the teacher run did not finish)" in res.stdout
    assert "3 run(s) failed" in res.stdout
    assert not os.path.exists(os.path.join(out, "IEP", "r0.5_s0"))


# ------------------------------------------------------------------ flags

@pytest.mark.parametrize("argv, flag", [
    (["--preset=nope"], "--preset"),
    ([], "--preset"),
    (["--preset=tiny", "--variants=KD"], "--variants"),
    (["--preset=tiny", "--rates=1.5"], "--rates"),
    (["--preset=tiny", "--rates=0"], "--rates"),
    (["--preset=tiny", "--rates=abc"], "--rates"),
    (["--preset=tiny", "--seeds="], "--seeds"),
    (["--preset=tiny", "--seeds=-1"], "--seeds"),
    (["--preset=tiny", "--extra=stop_after=1"], "--extra"),
    (["--preset=tiny", "--extra=--seed=3"], "--extra"),
    (["--preset=tiny", "--max_runs=-1"], "--max_runs"),
    (["--preset=tiny", "--bogus=1"], "bogus"),
    (["--preset=tiny", "stray"], "unexpected arguments"),
])
def test_bad_flags_are_one_line_errors(argv, flag, tmp_path):
    res = cli(*argv, f"--out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("experiments: error: "), res.stderr
    assert flag in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_out_dir_is_required():
    res = cli("--preset=tiny")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("experiments: error: ") and "--out_dir" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_help_lists_the_flags():
    res = cli("--help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith(ex.__doc__.strip().splitlines()[0])
    for flag in ("--preset", "--out_dir", "--[no]summarize_only", "--max_runs"):
        assert flag in res.stdout, flag


def test_main_in_process(tmp_path, capsys):
    """``main(argv)`` takes flags only and returns the exit status, as the other tools."""
    assert ex.main(["--summarize_only", f"--out_dir={tmp_path / 'absent'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"experiments: error: --out_dir {tmp_path / 'absent'}: no such directory"


def test_dry_run_of_the_paper_preset(tmp_path):
    out = tmp_path / "paper"
    res = cli("--preset=paper", f"--out_dir={out}", "--dry_run", f"--data_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("[")]
    methods = ("None", "AT", "FT", "AB", "RKD", "MHGD", "CO", "IEP")  # the paper's Table 1
    assert len(cmds) == 1 + len(methods) * 4 * 3
    assert "--main_scope=Teacher" in cmds[0] and "--Distillation=None" in cmds[0]
    for m in methods:
        assert sum(f"] {m} " in ln for ln in cmds) == 12, m
    for ln in cmds[1:]:
        assert "--dataset=cifar100" in ln and f"--data_dir={tmp_path}" in ln
        student = "] None " in ln
        assert ("--teacher_params=" in ln) != student
        assert "--init_epoch" not in ln  # every method keeps its own initial phase (IEP 20)
    assert any("--sample_rate=0.1 --seed=2" in ln for ln in cmds)
    assert not out.exists()


def test_presets_are_well_formed():
    for name, preset in ex.PRESETS.items():
        ex.check_preset(preset)
    paper = ex.PRESETS["paper"]["paper"]
    assert paper["None"] == {1.0: 76.09, 0.5: 69.77, 0.25: 59.28, 0.1: 40.65}
    assert paper["IEP"] == {1.0: 78.37, 0.5: 74.53, 0.25: 69.02, 0.1: 59.04}
    assert "black-box" in ex.PRESETS["paper"]["paper_note"]


# ------------------------------------------------------------------ tables on hand-written numbers

def row(variant, rate, seed, acc):
    return dict(variant=variant, rate=rate, seed=seed, final_acc=acc, best_acc=acc, epochs=1,
                wall_s=1.0, train_dir=f"{variant}/r{rate:g}_s{seed}")


def test_format_cell_on_hand_numbers():
    # 70, 72, 74: mean 72, squared deviations 4 + 0 + 4 = 8, / (3 - 1) = 4 -> sd 2
    assert ex.format_cell([70.0, 72.0, 74.0]) == "72.00 ± 2.00 (70.00, 72.00, 74.00)"
    # 1, 2: mean 1.5, sd sqrt(0.5) = 0.7071
    assert ex.format_cell([1.0, 2.0]) == "1.50 ± 0.71 (1.00, 2.00)"
    assert ex.format_cell([65.5]) == "65.50"
    assert ex.format_cell([]) == "—"


def test_markdown_tables_on_hand_numbers():
    rows = ([row("teacher", 1.0, 0, 80.0)]
            + [row("None", 1.0, s, v) for s, v in enumerate([70.0, 72.0, 74.0])]
            + [row("None", 0.5, 0, 60.5)]
            + [row("IEP", 1.0, s, v) for s, v in enumerate([73.0, 75.0, 77.0])])
    meta = {"preset": "hand", "variants": ["None", "IEP"], "commands": ["python -m x"],
            "paper": {"None": {"1": 71.0, "0.5": 62.0}}, "paper_note": "a note"}
    md = ex.results_markdown(rows, meta)
    assert "Teacher: 80.00 %" in md
    assert "| variant | rate 1 | rate 0.5 |" in md
    assert "| None | 72.00 ± 2.00 (70.00, 72.00, 74.00) | 60.50 |" in md
    assert "| IEP | 75.00 ± 2.00 (73.00, 75.00, 77.00) | — |" in md
    assert "| IEP | +3.00 | — |" in md                       # gain over None
    assert "| None | 1 | 72.00 ± 2.00 (70.00, 72.00, 74.00) | 71.00 | +1.00 |" in md
    assert "| None | 0.5 | 60.50 | 62.00 | -1.50 |" in md
    assert "Note: a note" in md
    assert "```\npython -m x\n```" in md
    png = ex.results_png(rows + [row("IEP", 0.25, 0, 50.0)])   # 3 rates: log axis
    assert png[:8] == PNG_SIGNATURE


def test_eta_and_clock():
    assert ex.eta([(10.0, 1.0), (30.0, 1.0)], 2.0) == pytest.approx(40.0)
    assert ex.eta([(10.0, 0.5)], 1.0) == pytest.approx(20.0)   # cost-weighted
    assert ex.eta([], 5.0) is None
    assert ex.hms(3725) == "01:02:05" and ex.hms(None) == "--:--:--"
    assert ex.run_cost(["--train_epoch=10", "--Distillation=IEP"], 0.5) == pytest.approx(15.0)
    assert ex.run_cost(["--train_epoch=10", "--Distillation=None"], 0.5) == pytest.approx(5.0)


# ------------------------------------------------------------------ the cpu_table1 preset

def test_dry_run_of_the_table1_preset(tmp_path):
    """Table 1's shape: the nine methods of the registry, teacher and student of the same width, 100
    main epochs each, every method's own initial phase, and the estimated time of the grid and of
    each rate column (from the stored benchmark JSONs)."""
    from iepkt_tf.distillers import METHODS

    out = tmp_path / "t1"
    res = cli("--preset=cpu_table1", f"--out_dir={out}", "--dry_run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    cmds = [ln for ln in lines if ln.startswith("[")]
    assert len(cmds) == 1 + len(METHODS) * 2 * 3 == 55
    for m in METHODS:
        assert sum(f"] {m} " in ln for ln in cmds) == 6, m
    for ln in cmds:
        assert "--train_epoch=100" in ln and "--init_epoch" not in ln
        assert "--dataset=synthetic_parts" in ln and "--synthetic_classes=100" in ln
        assert "--batch_size=128" in ln and "--precision=auto" in ln and "--val_every=10" in ln
    plan = {ln.split()[1]: ln for ln in lines if re.match(r"#   \S+ +--Distillation=", ln)}
    assert list(plan) == ["teacher"] + list(METHODS)
    inits = {"IEP": 20, "FT": 30, "AB": 30, "MHGD": 40}
    for m in METHODS:
        ln = plan[m]
        assert "100 main epochs" in ln, ln
        widths = re.findall(r"\(width (\d+)\)", ln)
        assert widths and len(set(widths)) == 1, ln             # student and teacher alike
        if m in inits:
            assert f"initial phase {inits[m]} epochs" in ln, ln
        else:
            assert "initial phase" not in ln, ln
    assert re.search(r"WResNet-10-1 \(width 1\) <- teacher WResNet-28-1 \(width 1\)", plan["IEP"])
    assert "steps per epoch (students): 39 at rate 0.1, 97 at rate 0.25" in res.stdout
    assert "docs/bench/table1" in res.stdout
    for what in ("rate 0.1 column (27 runs)", "rate 0.25 column (27 runs)", "teacher: ", "grid (55 runs)",
                 "on a quiet machine"):
        assert any(what in ln for ln in lines), what
    assert "not estimated" not in res.stdout        # a benchmark for every run
    assert not out.exists()


def test_table1_preset_is_its_own_family_and_cpu_is_unchanged():
    from iepkt_tf.distillers import METHODS

    t1, cpu = ex.PRESETS["cpu_table1"], ex.PRESETS["cpu"]
    assert list(t1["variants"]) == list(METHODS)
    assert all(f == [f"--Distillation={m}"] for m, f in t1["variants"].items())
    assert t1["family"] != cpu.get("family", "cpu") and t1["rates"] == [0.1, 0.25]
    assert t1["paper"]["IEP"][0.1] == 59.04 and t1["seeds"] == [0, 1, 2]
    assert cpu["common"] == ["--dataset=synthetic_parts", "--precision=float32", "--batch_size=64",
                             "--val_batch_size=200", "--teacher_arch=WResNet-16-2",
                             "--student_arch=WResNet-10-1", "--vis_every=0", "--log_every=100000"]
    assert cpu["rate_flags"] == {0.1: ["--train_epoch=40"], 1.0: ["--train_epoch=10"]}
    assert cpu["variants"]["IEP"] == ["--Distillation=IEP", "--init_epoch=5"]


def test_steps_per_epoch_and_costs_follow_the_trainer():
    flags = ex.TABLE1_COMMON
    assert [ex.steps_per_epoch(flags, r) for r in (0.1, 0.25, 0.5, 1.0)] == [39, 97, 195, 390]
    assert ex.steps_per_epoch(ex.CPU_COMMON, 0.1) == 40 * 13 // 64
    assert ex.steps_per_epoch(["--dataset=TinyImageNet"], 1.0) is None
    # each method's default initial phase counts (the registry's default_init_epoch)
    assert ex.run_cost(["--Distillation=FT"], 1.0) == 130
    assert ex.run_cost(["--Distillation=MHGD", "--train_epoch=10"], 0.5) == 25
    assert ex.run_cost(["--Distillation=AB", "--init_epoch=5", "--train_epoch=10"], 1.0) == 15


def test_validated_is_the_trainers_rule():
    from iepkt_tf.config import validation_due

    for init in (0, 1, 3, 20):
        for train in (0, 1, 7, 100):
            for k in (1, 2, 3, 10):
                if init + train:
                    assert [ex.validated(e, init, train, k) for e in range(init + train)] == \
                        [validation_due(e, init, train, k) for e in range(init + train)]


def _write_run(run_dir, acc, **cfg):
    from iepkt_tf.mat_io import save_mat

    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run_config.json"), "w") as f:
        import json
        json.dump({"init_epoch": 0, "train_epoch": len(acc), **cfg}, f)
    save_mat(os.path.join(run_dir, "log.mat"), {"validation_acc": np.asarray(acc, np.float64)})
    save_mat(os.path.join(run_dir, "train_params.mat"), {"Student/full/biases": np.zeros(4)})


def test_read_result_with_skipped_validations(tmp_path):
    nan = float("nan")
    # --val_every 2 over 5 epochs: epochs 1, 3, 4 validated; best over them, final the last
    _write_run(tmp_path / "ok", [nan, 40.0, nan, 55.0, 50.0], val_every=2)
    res = ex.read_result(str(tmp_path / "ok"))
    assert (res["final_acc"], res["best_acc"], res["epochs"]) == (50.0, 55.0, 5)
    # an initial phase is not validated: IEP-like 2 + 3 epochs, --val_every 2 -> epochs 3 and 4
    _write_run(tmp_path / "init", [nan, nan, nan, 30.0, 35.0], init_epoch=2, train_epoch=3, val_every=2)
    assert ex.read_result(str(tmp_path / "init"))["best_acc"] == 35.0
    # a validated epoch without a value is damage; so is NaN in a run that validates every epoch
    _write_run(tmp_path / "hole", [nan, nan, nan, 55.0, 50.0], val_every=2)
    with pytest.raises(ex.InputError, match=r"epoch\(s\) 1, which --val_every 2 validates"):
        ex.read_result(str(tmp_path / "hole"))
    _write_run(tmp_path / "every", [nan, 40.0])
    with pytest.raises(ex.InputError, match="non-finite"):
        ex.read_result(str(tmp_path / "every"))
    _write_run(tmp_path / "inf", [float("inf"), 40.0], val_every=2)
    with pytest.raises(ex.InputError, match="non-finite"):
        ex.read_result(str(tmp_path / "inf"))
    # fewer entries than epochs: not finished (resumed by the runner)
    _write_run(tmp_path / "short", [nan, 40.0], val_every=2)
    cfg_path = tmp_path / "short" / "run_config.json"
    cfg_path.write_text('{"init_epoch": 0, "train_epoch": 5, "val_every": 2}')
    assert ex.read_result(str(tmp_path / "short")) is None


# ------------------------------------------------------------------ runs that must not be lost

def test_a_bad_extra_flag_is_one_line_before_any_run(tmp_path):
    for extra, expect in (("--Distilation=KD", "is not a flag of train_w_distill.py (did you mean "
                                               "--Distillation?)"),
                          ("--batch_size=abc", "--extra:"), ("--nokd_t_squared=1", "--extra:")):
        out = tmp_path / extra.strip("-").split("=")[0]
        res = cli("--preset=tiny", f"--out_dir={out}", f"--extra={extra}")
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("experiments: error: --extra") and expect in lines[0], lines
        assert not any(p.is_dir() for p in out.glob("*")) if out.exists() else True
    ok = cli("--preset=tiny", f"--out_dir={tmp_path / 'ok'}", "--extra=--nokd_t_squared",
             "--extra=--verbosity=0", "--dry_run")
    assert ok.returncode == 0, ok.stderr


def test_not_result_flags_are_the_configs_reporting_flags():
    from iepkt_tf import config

    assert set(ex.NOT_RESULT_FLAGS) == set(config.HPARAMS_EXCLUDE) | {"teacher_params", "verbosity"}


def test_a_folder_made_by_another_command_is_refused_then_set_aside_with_force(tmp_path):
    out = str(tmp_path / "grid")
    args = ["--preset=tiny", "--variants=None", "--rates=0.5", "--seeds=0", f"--out_dir={out}"]
    first = cli(*args, "--extra=--learning_rate=0.05")
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = os.path.join(out, "None", "r0.5_s0")
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "**", "*.mat"), recursive=True)}
    again = cli(*args, "--extra=--learning_rate=0.07")
    assert again.returncode == 2
    line = again.stderr.strip().splitlines()
    assert len(line) == 1 and "was made by another command (--learning_rate=0.05 differs" in line[0], line
    assert "--force" in line[0] and "skipped" not in again.stdout
    assert {p: open(p, "rb").read() for p in before} == before
    same = cli(*args, "--extra=--learning_rate=0.05", "--extra=--log_every=7")  # reporting only
    assert same.returncode == 0 and "(skipped, finished" in same.stdout, same.stdout + same.stderr
    forced = cli(*args, "--extra=--learning_rate=0.07", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    kept = run_dir + ".replaced-1"
    assert open(os.path.join(kept, "train_params.mat"), "rb").read() == \
        before[os.path.join(run_dir, "train_params.mat")]
    assert "--learning_rate=0.07" in open(os.path.join(run_dir, "console.log")).read()


def _pids_with(text):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        out.append(int(pid))
            except OSError:
                pass
    return out


def test_a_killed_runner_stops_its_run_and_keeps_its_wall_time(tmp_path):
    import signal
    import time

    out = str(tmp_path / "grid")
    proc = subprocess.Popen([sys.executable, "-m", "iepkt_tf.experiments", "--preset=tiny",
                             "--variants=None", "--rates=0.5", "--seeds=0", f"--out_dir={out}",
                             "--extra=--train_epoch=200"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(out, "teacher", "console.log")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.isfile(log) and "Epoch 001" in open(log).read():
                break
            time.sleep(1)
        else:
            pytest.fail("the teacher run did not start within 300 s")
        child = [p for p in _pids_with(os.path.join(out, "teacher")) if p != proc.pid]
        assert child, "no training process found"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 120
        while _pids_with(os.path.join(out, "teacher")) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _pids_with(os.path.join(out, "teacher")), "the run outlived its runner"
    finally:
        for p in _pids_with(out):
            os.kill(p, signal.SIGKILL)
    text = open(log).read()
    assert "Stopped by SIGTERM" in text, text[-500:]
    ex.begin_invocation(os.path.join(out, "teacher"))  # the next invocation recovers its time
    t = json.load(open(os.path.join(out, "teacher", "run_time.json")))
    assert t["invocations"] == 1 and t["wall_s"] > 1.0 and "running_since" in t
