import numpy as np
import pytest
import torch

from MedLSAMLib.errors import InputError
from MedLSAMLib.medlam.checkpoint import load_medlam, save_weights
from MedLSAMLib.medlam.network import CONFIGS, MedLAM
from MedLSAMLib.medlam.training import DISTANCE_RATIO, mss_loss, uam_loss

torch.set_num_threads(2)


def official_state_dict_shapes() -> dict:
    """Key names and shapes of the authors' medlam.pth, written out from the published
    architecture table (base 24, DataParallel prefix), independently of our network code."""
    convs = {  # name: (in, out)
        "conv0_1": (1, 48), "conv0_2": (48, 48), "conv1_1": (48, 48), "conv1_2": (48, 48),
        "conv2_1": (48, 48), "conv2_2": (48, 96), "conv3_1": (96, 96), "conv3_2": (96, 192),
        "conv4_1": (192, 192), "conv4_2": (192, 384), "conv5_1": (576, 192), "conv5_2": (192, 192),
        "conv6_1": (288, 96), "conv6_2": (96, 96), "conv7_1": (144, 96), "conv7_2": (96, 96),
        "conv8_1": (144, 96), "conv8_2": (96, 96),
    }
    shapes = {}
    for name, (cin, cout) in convs.items():
        shapes[f"module.{name}.model.conv1_1.Conv.weight"] = (cout, cin, 3, 3, 3)
        shapes[f"module.{name}.model.conv1_1.Conv.bias"] = (cout,)
    shapes["module.classification.0.weight"] = (3, 96, 1, 1, 1)
    shapes["module.classification.0.bias"] = (3,)
    for name, (cin, cout) in {"fc1": (24576, 192), "fc2": (192, 96), "fc3": (96, 3)}.items():
        shapes[f"module.{name}.weight"] = (cout, cin)
        shapes[f"module.{name}.bias"] = (cout,)
    return shapes


def test_official_checkpoint_loads_strictly(tmp_path):
    shapes = official_state_dict_shapes()
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.01 for k, s in shapes.items()}
    path = tmp_path / "medlam.pth"
    torch.save(state, path)  # the authors' file is a bare state dict
    model = load_medlam(path)
    assert model.config == CONFIGS["reference"]
    assert sum(np.prod(s) for s in shapes.values()) == sum(p.numel() for p in model.parameters())
    ours = model.state_dict()
    for k, v in state.items():
        assert torch.equal(ours[k[len("module."):]], v)
    assert len(ours) == len(state)  # InstanceNorm without affine adds nothing


def test_mismatched_or_malicious_checkpoint_refused(tmp_path):
    shapes = official_state_dict_shapes()
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    state["module.fc1.weight"] = torch.zeros(10, 10)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="do not match"):
        load_medlam(tmp_path / "bad.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="refused: this MedLAM checkpoint holds objects other than weights"):
        load_medlam(tmp_path / "evil.pth")
    with pytest.raises(InputError, match="no such MedLAM checkpoint file"):
        load_medlam(tmp_path / "missing.pt")


@pytest.mark.parametrize("name,scales,channels", [("reference", (4, 2, 1), 96), ("lite", (4, 2), 32)])
def test_network_shapes(name, scales, channels):
    model = MedLAM(CONFIGS[name]).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64, 64))
    assert out["position"].shape == (2, 3)
    assert [f.shape for f in out["features"]] == [(2, channels, 64 // s, 64 // s, 64 // s) for s in scales]
    assert model.config.feature_scales == scales


def test_own_checkpoint_round_trip_carries_config_and_frame(tmp_path):
    model = MedLAM(CONFIGS["lite"])
    save_weights(model, tmp_path / "w.pt", {"steps": 3})
    doc = torch.load(tmp_path / "w.pt", weights_only=True)
    assert doc["config"]["base_channels"] == 8 and doc["frame"]["canonical_axes"] == ["S", "A", "L"]
    back = load_medlam(tmp_path / "w.pt")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_uam_loss_zero_for_exact_offsets():
    a = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]])
    b = torch.tensor([[0.1, 0.1, 0.1], [-0.2, 0.0, 0.3]])
    offset = DISTANCE_RATIO * torch.tanh(a - b)
    assert uam_loss(a, b, offset).item() == pytest.approx(0.0, abs=1e-6)
    assert uam_loss(a, b, offset + 10.0).item() == pytest.approx(100.0, rel=1e-4)


def test_mss_loss_prefers_matching_features():
    """The loss is lower when the augmented view's features match the original's at the same place."""
    gen = torch.Generator().manual_seed(0)
    n, p = 2, 16
    coords = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32)] * 3, indexing="ij"), -1) * 3.0
    pos = coords[None].repeat(n, 1, 1, 1, 1)
    img = torch.ones(n, 1, p, p, p)
    feat = torch.randn(n, 8, p, p, p, generator=gen)
    same = mss_loss([feat], [feat], img, pos, pos, (1,), 10, torch.Generator().manual_seed(1))
    other = mss_loss([feat], [torch.randn(n, 8, p, p, p, generator=gen)], img, pos, pos, (1,), 10,
                     torch.Generator().manual_seed(1))
    assert same.item() < other.item()
