import os

import numpy as np
import pytest
import SimpleITK as sitk

from MedLSAMLib import io
from MedLSAMLib.errors import InputError
from MedLSAMLib.geometry import Geometry
from MedLSAMLib.preprocess import medlam_intensity, resample, to_canonical, window_to_uint8

from conftest import OBLIQUE, hn_case, phantom


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_keeps_geometry(tmp_path, geometry, suffix):
    vol = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 8.0)
    path = tmp_path / f"ct{suffix}"
    io.write_volume(vol, path)
    back = io.read_volume(path)
    assert back.geometry.is_close(vol.geometry, atol=1e-5)
    assert np.array_equal(back.array, vol.array)
    assert back.name == "ct"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def write_dicom_series(image: sitk.Image, folder, skip=(), shift_mm=None):
    """One CT slice per file, as a scanner exports them; ``skip``: slice indices left out,
    ``shift_mm``: {index: mm} moved along the slice normal (uneven spacing)."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    d = np.array(image.GetDirection()).reshape(3, 3)
    row_col = "\\".join(f"{v:.6f}" for v in [*d[:, 0], *d[:, 1]])
    spacing = image.GetSpacing()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        sl = image[:, :, k]
        origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + d[:, 2] * (shift_mm or {}).get(k, 0.0)
        for tag, value in (("0008|0060", "CT"), ("0020|000e", uid), ("0020|0032", "\\".join(f"{v:.4f}" for v in origin)),
                           ("0020|0037", row_col), ("0020|0013", str(k + 1)),
                           ("0028|0030", f"{spacing[1]}\\{spacing[0]}"), ("0018|0050", str(spacing[2]))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_series_folder(tmp_path):
    geom = Geometry([-100.0, -80.0, 40.0], [0.9, 0.9, 2.0], np.eye(3), (24, 20, 6))
    vol = phantom(geom, geom.ijk_to_lps([12, 10, 3]), 6.0)
    series = write_dicom_series(sitk.Cast(io.to_sitk(vol), sitk.sitkInt16), tmp_path / "CT_series")
    back = io.read_ct(series)
    assert back.name == "CT_series" and io.case_name(series) == "CT_series"
    assert back.geometry.size == geom.size
    assert np.allclose(back.geometry.origin, geom.origin, atol=1e-3)
    assert np.allclose(back.geometry.spacing, geom.spacing, atol=1e-3)
    assert np.array_equal(back.array, vol.array)


def test_dicom_series_that_is_not_a_regular_stack_is_refused(tmp_path):
    """ITK would stack these as if evenly spaced; every box would then be misplaced."""
    geom = Geometry([-100.0, -80.0, 40.0], [0.9, 0.9, 2.0], OBLIQUE, (16, 16, 8))
    image = sitk.Cast(io.to_sitk(phantom(geom, geom.ijk_to_lps([8, 8, 4]), 5.0)), sitk.sitkInt16)
    assert io.read_ct(write_dicom_series(image, tmp_path / "whole")).geometry.size == geom.size
    with pytest.raises(InputError, match=r"missing slice: 4\.00 mm between .* the others are 2\.00 mm apart") as exc:
        io.read_ct(write_dicom_series(image, tmp_path / "gap", skip={4}))
    assert str(exc.value).startswith(str(tmp_path / "gap")) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="uneven slice spacing"):
        io.read_ct(write_dicom_series(image, tmp_path / "uneven", shift_mm={5: 0.7}))
    with pytest.raises(InputError, match="two DICOM slices at the same position"):
        io.read_ct(write_dicom_series(image, tmp_path / "double", shift_mm={5: -2.0}))
    cut = write_dicom_series(image, tmp_path / "cut")
    slice_file = cut / "003.dcm"
    slice_file.write_bytes(slice_file.read_bytes()[:-200])  # pixel data ends early
    with pytest.raises(InputError, match=r"missing slice.*could not be read as part of it: 003\.dcm"):
        io.read_ct(cut)


def test_read_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        io.read_volume(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read") as exc:
        io.read_volume(junk)
    assert "\n" not in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        io.read_volume(empty)


def test_non_3d_and_vector_images_rejected(tmp_path):
    two_d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(two_d))
    with pytest.raises(InputError, match="3D"):
        io.read_volume(two_d)
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(InputError, match="scalar"):
        io.read_volume(rgb)


def test_mri_like_image_is_not_ct(tmp_path, geometry):
    mri = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 8.0, inside=800.0, outside=0.0)
    with pytest.raises(InputError, match="does not look like a CT"):
        io.check_ct(mri)
    io.check_ct(phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 8.0))  # CT passes


def test_atomic_path_removes_temporary_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_canonical_resampling_places_anatomy_correctly(geometry):
    """A ball at a known LPS position lands at the matching canonical voxel, on any input grid."""
    centre = geometry.ijk_to_lps([20.3, 14.6, 9.8])
    vol = phantom(geometry, centre, 6.0)
    canon = to_canonical(vol, spacing=1.5)
    arr = canon.array  # [S, A, L]
    kji = np.argwhere(arr > 0).mean(axis=0)
    found = canon.geometry.ijk_to_lps(kji[::-1])
    assert np.linalg.norm(found - centre) < 1.0
    assert vol.array.max() == 300.0  # input untouched


def test_canonical_axes_follow_anatomy():
    """Array axis 0 increases superior, axis 1 anterior, axis 2 left, whatever the storage order."""
    geom = Geometry([0, 0, 0], [2.0, 2.0, 2.0], OBLIQUE, (30, 30, 30))
    centre = geom.ijk_to_lps([15, 15, 15])
    canon = to_canonical(phantom(geom, centre + np.array([0, 0, 12.0]), 4.0), spacing=2.0)
    ref = to_canonical(phantom(geom, centre, 4.0), spacing=2.0)
    shift = np.argwhere(canon.array > 0).mean(0) - np.argwhere(ref.array > 0).mean(0)
    assert shift[0] == pytest.approx(6.0, abs=0.5) and abs(shift[1]) < 0.5 and abs(shift[2]) < 0.5
    ant = to_canonical(phantom(geom, centre + np.array([0, -12.0, 0]), 4.0), spacing=2.0)  # -y = anterior
    assert (np.argwhere(ant.array > 0).mean(0) - np.argwhere(ref.array > 0).mean(0))[1] == pytest.approx(6.0, abs=0.5)


def test_label_resampling_is_nearest(geometry):
    labels = phantom(geometry, geometry.ijk_to_lps([20, 15, 10]), 8.0, inside=7, outside=0)
    labels = labels.with_array(labels.array.astype(np.int16))
    out = resample(labels, Geometry(geometry.origin, geometry.spacing * 2, geometry.direction, (20, 15, 10)),
                   linear=False, default=0)
    assert set(np.unique(out.array)) == {0, 7}


def test_intensity_maps():
    hu = np.array([-2000, -1000, -600, -200, 0, 200, 850, 1500, 3000], dtype=np.float32)
    before = hu.copy()
    assert np.allclose(medlam_intensity(hu), [0, 0, 0.1, 0.2, 0.5, 0.8, 0.9, 1, 1])
    assert np.array_equal(window_to_uint8(hu, (-500, 1000)), [0, 0, 0, 51, 85, 119, 230, 255, 255])
    assert np.array_equal(hu, before)


def test_real_ct_reads_with_permuted_axes():
    ct, labels = hn_case("train-pats/pt_1")
    vol = io.read_ct(ct)
    assert vol.geometry.size == (128, 128, 128)
    assert vol.geometry.axial_axis == 2
    canon = to_canonical(vol)
    # head-and-neck CT resampled to 3 mm: ~ 320 mm field of view -> about 107 voxels
    assert canon.array.shape[0] == pytest.approx(128 * 2.5 / 3, abs=2)


def test_label_extent_matches_argwhere_bounds_and_empty_is_slicers_empty_extent():
    from MedLSAMLib.io import _label_extent

    ijk = np.zeros((9, 7, 5), np.uint8)
    ijk[2:6, 1:3, 4] = 5
    ijk[8, 6, 0] = 5
    ijk[0, 0, 0] = 2
    present = np.argwhere(ijk == 5)
    expected = [int(v) for a in range(3) for v in (present[:, a].min(), present[:, a].max())]
    assert _label_extent(ijk, 5) == expected == [2, 8, 1, 6, 0, 4]
    assert _label_extent(ijk, 2) == [0, 0, 0, 0, 0, 0]
    assert _label_extent(ijk, 9) == [0, -1, 0, -1, 0, -1]


def test_label_extents_in_the_occupied_block_equal_the_whole_volume_search():
    from MedLSAMLib.io import _label_extent, _label_extents

    rng = np.random.default_rng(3)
    ijk = np.zeros((30, 20, 12), np.uint8)
    ijk[5:9, 3:15, 2:4] = 1
    ijk[20:27, 11:12, 6:11] = 4
    ijk[rng.integers(0, 30, 5), rng.integers(0, 20, 5), rng.integers(0, 12, 5)] = 7
    labels = [1, 4, 7, 9]
    assert _label_extents(ijk, labels) == {label: _label_extent(ijk, label) for label in labels}
    assert _label_extents(ijk, [1, 4, 7, 9])[9] == [0, -1, 0, -1, 0, -1]
    assert _label_extents(np.zeros_like(ijk), [1]) == {1: [0, -1, 0, -1, 0, -1]}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    import os
    import stat

    from MedLSAMLib.io import current_umask, write_text_atomic

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_text_atomic(tmp_path / "out.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == mode
