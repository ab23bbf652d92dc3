import pytest
import torch

from MedLSAMLib.medlam.checkpoint import load_medlam
from MedLSAMLib.medlam.training import Trainer, TrainOptions

from conftest import hn_case


def make_trainer(out, steps):
    images = [hn_case("train-pats/pt_1")[0], hn_case("train-pats/pt_10")[0]]
    opts = TrainOptions(config="lite", steps=steps, batch_size=1, mss_points=8, checkpoint_minutes=1e6,
                        val_volumes=0, device="cpu", seed=7)
    return Trainer(images, out, opts, log=lambda m: None)


def test_three_steps_then_resume_continues_identically(tmp_path):
    first = make_trainer(tmp_path, steps=3)
    first.run()
    assert first.step == 3 and len(first.history) == 3
    for name in ("last.pt", "medlam.pt", "loss.csv", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert load_medlam(tmp_path / "medlam.pt").config.base_channels == 8

    resumed = make_trainer(tmp_path, steps=4)
    assert resumed.resume() and resumed.step == 3
    saved = first.optim.state_dict()["state"]
    loaded = resumed.optim.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert int(saved[k]["step"]) == int(loaded[k]["step"]) == 3
        assert torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"])
        assert torch.equal(saved[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"])

    # one more step from either the live run or the resumed run: same batch, same losses
    first.opts.steps = 4
    first.run()
    resumed.run(resume=False)  # state already restored above
    assert resumed.step == first.step == 4
    a, b = first.history[-1], resumed.history[-1]
    assert a["uam"] == pytest.approx(b["uam"], rel=1e-4) and a["mss"] == pytest.approx(b["mss"], rel=1e-4)
    assert "3," in (tmp_path / "loss.csv").read_text().splitlines()[3]
