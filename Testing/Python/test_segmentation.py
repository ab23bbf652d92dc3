"""Segmentation stage: real LiteMedSAM weights, SAM ViT-B plumbing, and the slice runner's geometry."""
import json

import numpy as np
import pytest
import torch

from MedLSAMLib.errors import InputError
from MedLSAMLib.io import read_ct, read_labels
from MedLSAMLib.preprocess import window_to_uint8
from MedLSAMLib.segment.backends import SAMViTB, LiteMedSAM, load_segmenter, model_frame_boxes
from MedLSAMLib.segment.slices import SegmentOptions, StructureRequest, segment_volume

from conftest import hn_case, phantom
from segmenters import ThresholdSegmenter

torch.set_num_threads(2)


def test_model_frame_boxes():
    b = model_frame_boxes([[0, 0, 127, 63]], (64, 128), 256)
    assert np.allclose(b, [[0, 0, 256, 256]])
    b = model_frame_boxes([[10, 20, 29, 39]], (100, 200), 1024)
    assert np.allclose(b, [[10 * 1024 / 200, 20 * 1024 / 100, 30 * 1024 / 200, 40 * 1024 / 100]])


@pytest.fixture(scope="module")
def litemedsam():
    return LiteMedSAM.load("cpu")


def test_litemedsam_segments_real_slices_and_reuses_embeddings(litemedsam):
    """Ground-truth boxes on a few real slices (the paper's manual-prompt protocol) give good masks."""
    ct_path, lab_path = hn_case("train-pats/pt_1")
    ct, lab = read_ct(ct_path), read_labels(lab_path)
    requests = []
    ks = {}
    for value, name in ((7, "Mandible"), (1, "Brainstem")):
        kji = np.argwhere(lab.array == value)
        mid = int(np.median(kji[:, 0]))
        ks[name] = [mid - 1, mid, mid + 1]
        sel = kji[np.isin(kji[:, 0], ks[name])]
        requests.append(StructureRequest(name, value, [[sel.min(0)[::-1].tolist(), sel.max(0)[::-1].tolist()]]))
    labels, stats, timing = segment_volume(ct, requests, litemedsam, SegmentOptions(slice_step=1))
    assert timing["slices"] == len(set(ks["Mandible"]) | set(ks["Brainstem"]))
    dice = {}
    for value, name in ((7, "Mandible"), (1, "Brainstem")):
        g = lab.array[ks[name]] == value
        p = labels[ks[name]] == value
        dice[name] = 2 * (g & p).sum() / (g.sum() + p.sum())
    # A compact structure is segmented well; the mandible's horseshoe-shaped middle slices are a
    # known weak spot of box-prompted SAM models (measured ~0.3 here), so only overlap is asked.
    assert dice["Brainstem"] > 0.6, dice
    assert dice["Mandible"] > 0.1, dice
    # decoding boxes in one batch gives the same answer as one box at a time
    img = window_to_uint8(ct.array[ks["Mandible"][1]])
    emb = litemedsam.embed(img[None])
    boxes = [[40, 40, 90, 90], [60, 50, 70, 60]]
    both = litemedsam.decode(emb[0], boxes, img.shape).numpy()
    one = litemedsam.decode(emb[0], boxes[1:], img.shape).numpy()[0]
    assert both.shape == (2, 128, 128) and np.allclose(both[1], one, atol=1e-4)


def test_sam_vit_b_plumbing_with_random_weights(tmp_path):
    seg = SAMViTB.build(None, "cpu")
    torch.manual_seed(0)
    image = np.zeros((1, 40, 60), np.uint8)
    image[0, 10:30, 20:40] = 200
    emb = seg.embed(image)
    assert emb.shape == (1, 256, 64, 64)
    probs = seg.decode(emb[0], [[20, 10, 39, 29], [0, 0, 59, 39]], (40, 60))
    assert probs.shape == (2, 40, 60) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    # a checkpoint file with SAM's key layout loads through weights_only; a wrong one is refused
    torch.save(seg.model.state_dict(), tmp_path / "sam_vit_b.pth")
    again = load_segmenter("medsam-vit-b", tmp_path / "sam_vit_b.pth")
    assert again.name == "medsam-vit-b" and len(again.describe()["sha256"]) == 64
    torch.save({"image_encoder.foo": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="does not match SAM ViT-B"):
        load_segmenter("sam-vit-b", tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="needs --segmenter-checkpoint"):
        load_segmenter("sam-vit-b")


def test_slice_runner_geometry_on_permuted_and_oblique_grids(geometry):
    """Boxes around a bright ball give back exactly the ball, whatever the storage order."""
    centre = geometry.ijk_to_lps([20, 15, 10])
    vol = phantom(geometry, centre, 7.0)
    truth = vol.array > 0
    kji = np.argwhere(truth)
    box = [kji.min(0)[::-1].tolist(), kji.max(0)[::-1].tolist()]
    labels, stats, timing = segment_volume(vol, [StructureRequest("ball", 5, [box])], ThresholdSegmenter(),
                                           SegmentOptions(margin_px_at_1024=0, slice_step=1))
    assert np.array_equal(labels == 5, truth)
    assert stats["ball"]["voxels"] == int(truth.sum()) and timing["slices"] == box[1][geometry.axial_axis] - box[0][geometry.axial_axis] + 1


def test_overlap_goes_to_the_more_probable_structure(geometry):
    vol = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 7.0)
    full = [[0, 0, 0], [s - 1 for s in geometry.size]]

    class Biased(ThresholdSegmenter):
        def decode(self, embedding, boxes, shape):
            p = super().decode(embedding, boxes, shape)
            return p * torch.tensor([0.7, 0.9])[: len(boxes), None, None]

    labels, stats, _ = segment_volume(vol, [StructureRequest("a", 1, [full]), StructureRequest("b", 2, [full])],
                                      Biased(), SegmentOptions(margin_px_at_1024=0, slice_step=1))
    assert stats["a"]["voxels"] == 0 and stats["b"]["voxels"] == int((vol.array > 0).sum())


# --- key slices and shape-based interpolation (slice_step > 1) --------------------------------
def test_key_slices_keep_first_middle_and_last():
    from MedLSAMLib.segment.slices import key_slices

    assert key_slices(10, 20, 1) == set(range(10, 21))
    assert key_slices(10, 20, 4) == {10, 12, 15, 16, 20}
    assert key_slices(7, 7, 3) == {7}


def test_signed_distance_interpolation_gives_the_intermediate_disk():
    """Between decoded disks of radius 4 and 10 mm, the middle slice gets a disk of about 7 mm."""
    from MedLSAMLib.segment.slices import _Region

    size = 41
    yy, xx = np.mgrid[:size, :size] - size // 2
    region = _Region({s: (0, 0, size - 1, size - 1) for s in range(3)})
    region.put(0, (0, 0, size - 1, size - 1), (np.hypot(yy, xx) <= 4).astype(np.float32))
    region.put(2, (0, 0, size - 1, size - 1), (np.hypot(yy, xx) <= 10).astype(np.float32))
    assert region.interpolate(0.5, (1.0, 1.0)) == 1
    middle = region.prob[1] > 0.5
    truth = np.hypot(yy, xx) <= 7
    assert 2 * (middle & truth).sum() / (middle.sum() + truth.sum()) > 0.97


def test_skipped_slices_reproduce_a_ball_on_any_grid(geometry):
    """Every third slice encoded, the others interpolated: the ball is still there, on identity,
    oblique and permuted grids, and fewer slices went through the encoder."""
    centre = geometry.ijk_to_lps((np.asarray(geometry.size) - 1) / 2)
    vol = phantom(geometry, centre, 11.0)
    truth = vol.array > 0
    kji = np.argwhere(truth)
    box = [kji.min(0)[::-1].tolist(), kji.max(0)[::-1].tolist()]
    request = [StructureRequest("ball", 5, [box])]
    full, _, t_full = segment_volume(vol, request, ThresholdSegmenter(), SegmentOptions(margin_px_at_1024=0, slice_step=1))
    skip, _, t_skip = segment_volume(vol, request, ThresholdSegmenter(), SegmentOptions(margin_px_at_1024=0, slice_step=3))
    assert np.array_equal(full == 5, truth)
    assert t_skip["slices"] < t_full["slices"] and t_skip["interpolated_slices"] == t_full["slices"] - t_skip["slices"]
    p = skip == 5
    assert 2 * (p & truth).sum() / (p.sum() + truth.sum()) > 0.93


def test_a_skipped_slice_run_equals_the_full_run_on_its_encoded_slices(litemedsam):
    """Real CT, real LiteMedSAM: the key slices of a step-3 run carry exactly the full run's masks."""
    from MedLSAMLib.segment.slices import key_slices

    ct_path, lab_path = hn_case("train-pats/pt_1")
    ct, lab = read_ct(ct_path), read_labels(lab_path)
    requests, ranges = [], []
    for value, name in ((1, "Brainstem"), (3, "RightParotid")):
        kji = np.argwhere(lab.array == value)
        mid = int(np.median(kji[:, 0]))
        sel = kji[(kji[:, 0] >= mid - 4) & (kji[:, 0] <= mid + 4)]
        requests.append(StructureRequest(name, value, [[sel.min(0)[::-1].tolist(), sel.max(0)[::-1].tolist()]]))
        ranges.append((int(sel[:, 0].min()), int(sel[:, 0].max())))
    full, _, _ = segment_volume(ct, requests, litemedsam, SegmentOptions(slice_step=1))
    skip, _, timing = segment_volume(ct, requests, litemedsam, SegmentOptions(slice_step=3))
    keys = sorted(set().union(*(key_slices(a, b, 3) for a, b in ranges)))
    assert timing["slices"] == len(keys) and timing["interpolated_slices"] > 0
    differ = np.count_nonzero(full[keys] != skip[keys])
    assert differ <= 0.001 * full[keys].size, differ  # batching may move a borderline pixel, no more


def test_onnx_runtime_encoder_matches_torch_on_real_slices(tmp_path):
    """The exported encoder (ONNX Runtime) against torch on real CT slices: embeddings within
    1e-4, identical masks; the second load reads the cached model instead of exporting again."""
    pytest.importorskip("onnxruntime")
    from MedLSAMLib.segment import RUNTIMES

    assert "onnxruntime" in RUNTIMES
    ct = read_ct(hn_case("validation-pats/pt_201")[0])
    slices = [window_to_uint8(ct.array[k, 30:110, 20:100]) for k in (40, 60)]
    reference = LiteMedSAM.load("cpu").use_runtime("torch")
    fast = LiteMedSAM.load("cpu").use_runtime("onnxruntime", cache_dir=tmp_path)
    assert fast.runtime == "onnxruntime" and fast.describe()["runtime"] == "onnxruntime"
    a, b = reference.embed(slices), fast.embed(slices)
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4
    boxes = [[10, 10, 60, 60], [25, 30, 45, 50]]
    for n in range(2):
        assert np.array_equal(reference.decode(a[n], boxes, (80, 80)).numpy() > 0.5,
                              fast.decode(b[n], boxes, (80, 80)).numpy() > 0.5)
    folder = fast.encoder.folder
    stamp = (folder / "encoder.onnx").stat().st_mtime_ns
    again = LiteMedSAM.load("cpu").use_runtime("onnxruntime", cache_dir=tmp_path)
    assert again.encoder.folder == folder and (folder / "encoder.onnx").stat().st_mtime_ns == stamp
    source = json.loads((folder / "source.json").read_text())
    assert source["source_sha256"] == fast.sha256
    with pytest.raises(InputError, match="LiteMedSAM only"):
        SAMViTB.build(None, "cpu").use_runtime("onnxruntime")
