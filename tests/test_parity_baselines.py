"""The baselines against the authors' own code (iepkt_tf/parity_baselines.py, fixtures
i_baselines_*.npz): every method has rows and passes, the rows compare computed values (a damaged
input fails them), FT as the authors run it is not the FT its text writes, and the fixture maker
rebuilds a fixture from the kdparity files it came from."""
import numpy as np
import pytest

from iepkt_tf import parity, parity_baselines
from tests.conftest import FIXTURES

FILES = sorted(FIXTURES.glob("i_baselines_*.npz"))


@pytest.fixture(scope="module")
def rows():
    out = []
    for path in FILES:
        out += parity.run_file(path)
    return out


def test_every_method_is_checked_and_passes(rows):
    assert len(FILES) >= 2  # equal widths (MHGD, AT's paper form) and unequal widths
    failed = [r.format() for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    names = {r.name.split(":", 1)[1] for r in rows}
    for probe in ("tf2/KD/loss", "tf1/KD_tf1/grad_logits", "tf2/AT/grad_con3/kernel", "tf1/AT_tf1/loss",
                  "tf2/FT/as_run/loss", "tf2/FT/as_run/grad_tr/conv2", "tf2/FT/as_run/recon_loss",
                  "tf2/FT/as_run/recon_grad_dec/convt2", "tf2/AB/loss", "tf2/AB/closure_grad_s1",
                  "tf2/RKD/loss", "tf1/RKD_tf1/grad_pooled", "tf1/MHGD/loss", "tf1/MHGD/mha_loss",
                  "tf2/CO/margin2", "tf2/CO/grad_s1"):
        assert probe in names, probe


def test_ft_within_the_issue_bounds(rows):
    ft = [r for r in rows if "/FT/" in r.name]
    losses = [r for r in ft if r.name.endswith(("/loss", "/recon_loss"))]
    assert losses and all(r.rel_err <= 1e-5 for r in losses)
    assert all(r.rel_err <= 1e-3 for r in ft)


def _damaged(path, key, rng):
    fix = parity.Fixture(path)
    a = fix.arrays[key]
    fix.arrays[key] = (a + 0.01 * np.abs(a).max() * rng.normal(size=a.shape)).astype(a.dtype)
    return fix


@pytest.mark.parametrize("key, method", [("in/s_logits", "tf2/KD/"), ("in/con2/kernel", "tf2/AT/"),
                                         ("in/ft/tr/conv1", "tf2/FT/as_run/grad"),
                                         ("in/ft/dec/convt1", "tf2/FT/as_run/recon"),
                                         ("in/s_pre2", "tf2/AB/"), ("in/t_logits", "tf2/RKD/"),
                                         ("in/mhgd/MHA1/Estimator/fc0/weights", "tf1/MHGD/mha_loss"),
                                         ("in/t_beta1", "tf2/CO/margin1")])
def test_a_damaged_input_fails_its_method(key, method):
    fix = _damaged(FILES[0], key, np.random.default_rng(0))
    failed = [r.name for r in parity_baselines.check_baselines(fix) if not r.passed]
    assert any(method in n for n in failed), (key, failed[:5])


def test_the_paper_form_of_ft_is_another_network(monkeypatch):
    """FT.py's text (``--ft_form=paper``) is 10 % or more off what the authors' code computes."""
    fix = parity.Fixture(FILES[0])
    case = parity_baselines._Case(fix)
    build = case.build
    monkeypatch.setattr(case, "build", lambda name, **o: build(name, **dict(o, ft_form="paper")))
    rows = {r.name.split(":", 1)[1]: r for r in parity_baselines._ft(case)}
    assert rows["tf2/FT/as_run/loss"].rel_err > 0.1 or rows["tf2/FT/as_run/grad_s3"].rel_err > 0.1


def test_maker_rebuilds_a_fixture_from_kdparity_files(tmp_path):
    """Split a shipped fixture back into kdparity's case/tf2/tf1 files; the maker gives it back."""
    with np.load(FILES[1]) as z:
        arrays = {k: z[k] for k in z.files}
    name = FILES[1].stem[len("i_baselines_"):]
    work = tmp_path / "work"
    work.mkdir()
    for side, prefix in (("case", "in/"), ("tf2", "tf2/"), ("tf1", "tf1/")):
        np.savez(work / f"{side}_{name}.npz",
                 **{k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    (written,) = parity_baselines.make_fixtures(work, tmp_path)
    with np.load(written) as z:
        rebuilt = {k: z[k] for k in z.files}
    assert set(rebuilt) == set(arrays)
    for k in arrays:
        if k != "__meta__":
            assert np.array_equal(rebuilt[k], arrays[k]) and rebuilt[k].dtype == arrays[k].dtype, k
    assert parity.run_file(written) and all(r.passed for r in parity.run_file(written))


def test_maker_errors_are_one_line(tmp_path, capsys):
    assert parity_baselines.main(["--kdparity_work", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity_baselines: error: --kdparity_work") and "\n" not in err
    np.savez(tmp_path / "case_x.npz", a=np.zeros(1))
    assert parity_baselines.main(["--kdparity_work", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "tf2_x.npz" in capsys.readouterr().err
