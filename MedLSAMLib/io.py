"""Reading and writing volumes (NIfTI, NRRD, MHA, DICOM series) with exact geometry.

A :class:`Volume` is a numpy array in SimpleITK / Slicer order ``[k, j, i]`` plus the
:class:`~MedLSAMLib.geometry.Geometry` that places it in LPS space. Arrays handed in are
never modified in place; every file is written atomically.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Geometry

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


@dataclass
class Volume:
    """A 3D scalar image: ``array[k, j, i]`` and its physical geometry."""

    array: np.ndarray
    geometry: Geometry
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.array.ndim != 3:
            raise InputError(f"{self.name or 'volume'}: expected a 3D image, got {self.array.ndim}D")
        if tuple(self.array.shape) != self.geometry.shape_kji:
            raise ValueError(f"array shape {self.array.shape} does not match geometry {self.geometry.shape_kji}")

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        return Volume(array, self.geometry, self.name if name is None else name, dict(self.meta))

    def head_foot_slab(self, lo_mm: float, hi_mm: float) -> "Volume | None":
        """The slices whose head-foot position (LPS z) lies in [lo_mm, hi_mm]: a shorter scan of
        the same patient; None when fewer than 3 slices do."""
        g = self.geometry
        ax = g.axial_axis
        index = np.zeros((g.size[ax], 3))
        index[:, ax] = np.arange(g.size[ax])
        z = g.ijk_to_lps(index)[:, 2]
        keep = np.flatnonzero((z >= lo_mm - 1e-3) & (z <= hi_mm + 1e-3))
        if len(keep) < 3:
            return None
        lo, hi = np.zeros(3, int), np.asarray(g.size) - 1
        lo[ax], hi[ax] = keep.min(), keep.max()
        return self.crop(lo, hi)

    def crop(self, lo_ijk, hi_ijk) -> "Volume":
        """The block ``lo_ijk``..``hi_ijk`` (inclusive, clipped to the image), copied."""
        lo = np.clip(np.asarray(lo_ijk, int), 0, np.asarray(self.geometry.size) - 1)
        hi = np.clip(np.asarray(hi_ijk, int), lo, np.asarray(self.geometry.size) - 1)
        array = np.ascontiguousarray(self.array[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1])
        return Volume(array, self.geometry.sub_grid(lo, hi), self.name, dict(self.meta))


def case_name(path: str | os.PathLike) -> str:
    """Input file name without its extension(s), or the folder name for a DICOM series."""
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


# --- SimpleITK conversion ----------------------------------------------------------------
def geometry_from_sitk(image: sitk.Image) -> Geometry:
    return Geometry(
        origin=np.array(image.GetOrigin()),
        spacing=np.array(image.GetSpacing()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        size=image.GetSize(),
    )


def to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    apply_geometry(image, volume.geometry)
    return image


def apply_geometry(image: sitk.Image, geometry: Geometry) -> None:
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))


def from_sitk(image: sitk.Image, name: str = "", share: bool = False) -> Volume:
    """A Volume of ``image``'s pixels. ``share``: the array uses the image's own pixel buffer
    instead of a copy (for an image nobody else holds: a 512 x 512 x 300 float copy costs
    0.2-0.5 s, most of it touching fresh memory)."""
    if image.GetDimension() != 3:
        raise InputError(f"{name or 'image'}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name or 'image'}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    array = np.asarray(_PixelBuffer(image)) if share else sitk.GetArrayFromImage(image)
    return Volume(array, geometry_from_sitk(image), name)


class _PixelBuffer:
    """An ITK image's pixel buffer as NumPy sees it: the array made from it keeps this object, and
    so the image, alive (SimpleITK's own array view does not). Writable: the image is not shared."""

    def __init__(self, image: sitk.Image):
        self._image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


# --- reading -----------------------------------------------------------------------------
def read_volume(path: str | os.PathLike, pixel_type: int | None = None) -> Volume:
    """Read a NIfTI / NRRD / MHA file or a DICOM series folder; one-line errors on bad input."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    nifti = p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))
    try:
        with (nifti_checked(p) if nifti else contextlib.nullcontext(p)) as readable, _native_stderr_held_back():
            image = _read_dicom_series(p) if p.is_dir() else sitk.ReadImage(str(readable))
    except RuntimeError as exc:  # SimpleITK reports every read failure as RuntimeError
        raise InputError(f"{p}: {_explain_read_error(p, str(exc))}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if pixel_type is not None and image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1:
        image = sitk.Cast(image, pixel_type)  # after reading: a colour image must not be averaged to grey
    vol = from_sitk(image, case_name(p), share=True)
    vol.meta["path"] = str(p)
    return vol


@contextlib.contextmanager
def _native_stderr_held_back():
    """ITK's readers print their own diagnostics straight to the C-level stderr (MetaImage: "data
    not read completely ..."), which would add lines to our one-line error. Hold them back while
    reading; pass them on if the read succeeds (they may be warnings worth seeing), drop them if it
    fails (the error we raise says it better). Main thread only: redirecting a file descriptor is
    process-wide."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (embedded interpreters)
        yield
        return
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if succeeded:
            held.seek(0)
            if text := held.read():
                os.write(2, text)
        held.close()


def _explain_read_error(path: Path, itk_text: str) -> str:
    """ITK's read error (a C++ trace) in the user's terms."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes): an interrupted copy? Copy the file again"
    if "Unable to determine ImageIO reader" in itk_text:
        return ("cannot read as a medical image: not a NIfTI, NRRD or MetaImage file (or a folder holding one "
                "DICOM series)")
    if any(k in itk_text for k in ("fread got only", "not read completely", "cannot be read", "trouble reading",
                                   "premature", "EOF")):
        return "cannot read as a medical image: its data is damaged or ends early (an interrupted copy? Copy it again)"
    detail = [ln.strip() for ln in itk_text.splitlines() if ln.strip() and not ln.startswith("Exception thrown")]
    last = re.sub(r"\(0x[0-9a-f]+\)|/\S+", "", detail[-1] if detail else "unknown error").strip(" :")
    return f"cannot read as a medical image ({last[:160]})"


def check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file whose voxel data ends before its header says (an interrupted copy or
    download) or whose gzip stream is damaged. NRRD and MetaImage readers refuse such files
    themselves."""
    with nifti_checked(path, keep=False):
        pass


@contextlib.contextmanager
def nifti_checked(path: Path, keep: bool = True):
    """The file the image reader should read for a NIfTI ``path``, checked complete.

    ITK reads a cut NIfTI, or a gzip stream damaged in the middle, without complaint (the rest
    becomes zeros). A ``.nii`` is checked against its header's size. A ``.nii.gz`` is decompressed
    once, here (the gzip CRC and length checked on the way), into a temporary ``.nii`` that the
    reader then reads without decompressing again (``keep=False``: nothing is written)."""
    import gzip
    import struct
    import zlib

    compressed = path.name.lower().endswith(".gz")
    with open(path, "rb") as f:
        head = f.read(544)
    if not compressed or head[:2] != b"\x1f\x8b":  # plain NIfTI, or not gzip at all (the reader says so)
        if not compressed:
            expected = _nifti_data_end(head, struct)
            total = os.path.getsize(path)
            if expected is not None and total < expected:
                raise InputError(f"{path}: the image data ends early ({total:,} of {expected:,} bytes): an "
                                 "interrupted copy? Copy the file again")
        yield path
        return
    plain = None
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(544)
            expected = _nifti_data_end(header, struct)
            if expected is None:  # not a header we know: let the reader decide
                plain = None
            else:
                sink = tempfile.NamedTemporaryFile(suffix=".nii", delete=False) if keep else None
                plain = Path(sink.name) if sink else None
                total = len(header)
                with (sink or contextlib.nullcontext()):
                    if sink:
                        sink.write(header)
                    while chunk := f.read(1 << 22):
                        total += len(chunk)
                        if sink:
                            sink.write(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        if plain:
            plain.unlink(missing_ok=True)
        raise InputError(f"{path}: the compressed data is damaged or ends early ({exc.__class__.__name__}): "
                         "an interrupted copy? Copy the file again") from None
    try:
        if expected is not None and total < expected:
            raise InputError(f"{path}: the image data ends early ({total:,} of {expected:,} bytes): an interrupted "
                             "copy? Copy the file again")
        yield plain or path
    finally:
        if plain:
            plain.unlink(missing_ok=True)


def _nifti_data_end(header: bytes, struct) -> int | None:
    """Byte offset where a NIfTI-1/2 file's voxel data ends, from its header (None if not NIfTI)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        n = int(dims[0])
        if not 1 <= n <= 7 or bitpix <= 0:
            return None
        voxels = int(np.prod([max(int(d), 1) for d in dims[1:n + 1]], dtype=np.int64))
        return max(offset, 348) + voxels * bitpix // 8
    return None


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series; put one series per folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    check_dicom_slices(files, str(folder), folder)
    reader.SetFileNames(files)
    return reader.Execute()


def check_dicom_slices(files, where: str, folder: Path | None = None) -> None:
    """Refuse a series that is not one regular stack: a missing slice, two slices at one position,
    or uneven spacing (ITK would stack such slices as if evenly spaced, misplacing every box).
    Only the headers are read; a slice whose header cannot be read is named. ``where`` names the
    series in messages; ``folder``, if the series is a folder, lets a gap name the folder's files
    that were not part of it (unreadable slices)."""
    positions, normal = [], None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        try:
            header.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{where}: cannot read the DICOM slice {Path(name).name} (damaged or not DICOM); "
                             "export the series again") from None
        if not (header.HasMetaDataKey("0020|0032") and header.HasMetaDataKey("0020|0037")):
            return  # no patient position (e.g. a secondary capture): nothing to check against
        try:
            position = [float(v) for v in header.GetMetaData("0020|0032").split("\\")]
            orientation = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
        except ValueError:
            raise InputError(f"{where}: the DICOM slice {Path(name).name} has an unreadable position or "
                             "orientation; export the series again") from None
        if normal is None:
            normal = np.cross(orientation[:3], orientation[3:6])
        positions.append(float(np.dot(position, normal)))
    if len(positions) < 3:
        return
    z = np.sort(positions)
    gaps = np.diff(z)
    step = float(np.median(gaps))
    tolerance = max(0.01 * step, 0.01)  # mm: positions are printed with a few decimals
    if step <= tolerance or np.any(gaps <= tolerance):
        at = z[1:][gaps <= tolerance][0] if np.any(gaps <= tolerance) else z[0]
        raise InputError(f"{where}: two DICOM slices at the same position ({at:.2f} mm); the folder mixes "
                         "series or holds a duplicate: keep one series per folder")
    bad = np.flatnonzero(np.abs(gaps - step) > tolerance)
    if len(bad):
        k = int(bad[0])
        what = (f"a missing slice: {gaps[k]:.2f} mm between the slices at {z[k]:.2f} and {z[k + 1]:.2f} mm where "
                f"the others are {step:.2f} mm apart" if abs(gaps[k] / step - round(gaps[k] / step)) < 0.1
                and gaps[k] > step else f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)")
        listed = {Path(f).name for f in files}
        unread = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed
                        and not p.name.startswith(".")) if folder is not None else []
        hint = f" ({len(unread)} file(s) of the folder could not be read as part of it: {', '.join(unread[:3])})" \
            if unread else ""
        raise InputError(f"{where}: DICOM series with {what}{hint}; MedLSAM needs evenly spaced slices: export "
                         "the complete series (or resample it to a regular grid) and try again")


def read_json(path: str | os.PathLike, what: str, missing_hint: str = ""):
    """Parse a JSON file (data only), with one-line errors naming ``what`` it should be."""
    import json

    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such {what}{missing_hint}") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a JSON {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not a JSON {what} ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_ct(path: str | os.PathLike) -> Volume:
    """Read a CT and check that it holds Hounsfield units (float32 array)."""
    vol = read_volume(path, sitk.sitkFloat32)
    check_ct(vol)
    return vol


def read_labels(path: str | os.PathLike) -> Volume:
    vol = read_volume(path)
    if not np.issubdtype(vol.array.dtype, np.integer):
        rounded = np.rint(vol.array)
        if not np.allclose(rounded, vol.array):
            raise InputError(f"{path}: label map holds non-integer values; expected a label map")
        vol = vol.with_array(rounded.astype(np.int32))
    return vol


def check_ct(volume: Volume) -> None:
    """Reject images that are not CT in Hounsfield units (MRI, PET, pre-normalised data).

    A CT in HU has air well below -500 HU around or inside the body; MRI and normalised
    images start at or near zero. Small scans must still contain some air or fat.
    """
    arr = volume.array
    if arr.size and not np.isfinite(arr.sum(dtype=np.float64)):  # one pass, no mask the size of the scan
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{volume.name or 'image'}: {bad:,} of {arr.size:,} voxels are not numbers (NaN or "
                         "infinite); not a valid CT: export the scan again")
    # the 1st percentile of about 2 million evenly spread voxels: the same answer as of all of them
    # to within a few HU, without sorting a 512 x 512 x 600 scan
    step = max(1, arr.size // 2_000_000)
    low = float(np.percentile(arr.reshape(-1)[::step], 1.0)) if arr.size else 0.0
    if low > -500:
        raise InputError(
            f"{volume.name or 'image'}: does not look like a CT in Hounsfield units "
            f"(1st percentile {low:.0f}, expected air near -1000); MedLSAM needs raw CT HU, not MRI or normalised data"
        )
    if min(volume.geometry.size) < 2:
        raise InputError(f"{volume.name or 'image'}: image is not 3D (size {volume.geometry.size})")


# --- writing -----------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask alone would set
    it for a moment, and a worker thread creating a file then would get the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same extension); rename over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith((".nii.gz", ".seg.nrrd")) else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs follow the umask like any tool's
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ".<target name>.<8 random characters>.tmp<target extension>", as atomic_path names them
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z.]+)?$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporaries that :func:`atomic_path` left in ``folder`` when a process was killed
    mid-write. Only for a folder no other writer is using (the batch holds its output lock)."""
    removed = []
    for p in Path(folder).iterdir():
        if p.is_file() and _TEMPORARY.match(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(volume), str(tmp), compress)


def _label_extent(ijk: np.ndarray, label: int) -> list[int]:
    """[i0, i1, j0, j1, k0, k1] of ``label`` in an [i, j, k] array, or Slicer's empty extent.

    Per-axis ``any`` projections keep memory at one boolean volume (argwhere on a 512 x 512 x 600
    scan would build an N x 3 int64 array per segment).
    """
    return _mask_extent(ijk == label)


def _mask_extent(mask: np.ndarray) -> list[int]:
    """[i0, i1, j0, j1, k0, k1] of the true voxels of an [i, j, k] mask, or Slicer's empty extent."""
    extent = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if not len(hit):
            return [0, -1, 0, -1, 0, -1]
        extent += [int(hit[0]), int(hit[-1])]
    return extent


def _label_extents(ijk: np.ndarray, labels) -> dict[int, list[int]]:
    """:func:`_label_extent` of each label, searched only in the block that holds any label (one
    pass over the whole volume, not one per label)."""
    whole = _mask_extent(ijk != 0)
    if whole[1] < whole[0]:
        return {label: [0, -1, 0, -1, 0, -1] for label in labels}
    block = ijk[whole[0]:whole[1] + 1, whole[2]:whole[3] + 1, whole[4]:whole[5] + 1]
    offset = [whole[0], whole[0], whole[2], whole[2], whole[4], whole[4]]
    out = {}
    for label in labels:
        extent = _label_extent(block, label)
        out[label] = [e + o for e, o in zip(extent, offset)] if extent[1] >= extent[0] else extent
    return out


def write_segmentation(labels: Volume, segments: list[dict], path: str | os.PathLike) -> None:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``, one layer).

    ``segments``: dicts with ``name``, ``label`` (value in ``labels``), ``color`` (RGB 0-1) and
    optionally ``terminology`` (slicerio's form, see :mod:`MedLSAMLib.terminology`).
    Segments keep the label map's values, so the file and the label map agree voxel for voxel.
    """
    import slicerio

    # slicerio/nrrd index voxels as [i, j, k]: the transposed view of the [k, j, i] array is
    # Fortran-ordered, which is the order nrrd writes, so no copy is made in either direction
    # (a C-ordered copy cost 1.8 s of a 512 x 512 x 300 case's 2.4 s of writing).
    ijk = labels.array.transpose(2, 1, 0)
    dtype = np.uint8 if max((s["label"] for s in segments), default=0) < 256 else np.uint16
    seg = {
        "voxels": ijk.astype(dtype, copy=False),
        "ijkToLPS": labels.geometry.ijk_to_lps_matrix,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [],
    }
    extents = _label_extents(seg["voxels"], [s["label"] for s in segments])
    for s in segments:
        extent = extents[s["label"]]
        segment = {"id": s["name"], "name": s["name"], "labelValue": int(s["label"]), "layer": 0,
                   "color": [float(c) for c in s["color"]], "extent": extent}
        if s.get("terminology"):
            segment["terminology"] = s["terminology"]
        seg["segments"].append(segment)
    with atomic_path(path) as tmp:
        # gzip level 1: a label map is mostly zeros, so the file stays small (a few hundred kB for
        # 512 x 512 x 300) while writing takes 0.2 s instead of level 9's 0.5 s
        slicerio.write_segmentation(str(tmp), seg, compression_level=1)
