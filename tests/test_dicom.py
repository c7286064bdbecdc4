"""DICOM series reading (orthodiff_nnunet.io.dicom): geometry, series and echo selection, privacy."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.io.dicom import DicomError, list_series, read_series, write_series
from orthodiff_nnunet.orientation import detect_plane

from conftest import PLANE_DIRECTIONS, rotation

#: Right-handed DICOM-style directions (k = i x j, as every DICOM reader returns them).
RH_DIRECTIONS = {
    "sag": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),  # i: A->P, j: S->I, k: L->R
    "cor": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),  # i: R->L, j: S->I, k: A->P
    "ax": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float),  # i: R->L, j: A->P, k: I->S
}
SPACING = (0.55, 0.6, 3.3)
ORIGIN = (-12.5, 30.25, 41.125)


def _volume(shape=(6, 10, 12), seed=0, lo=-1500, hi=3000, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(dtype)


def _write(folder: Path, array=None, direction=None, **kw) -> list[Path]:
    array = _volume() if array is None else array
    direction = RH_DIRECTIONS["sag"] if direction is None else direction
    return write_series(folder, array, SPACING, ORIGIN, np.asarray(direction).flatten().tolist(), **kw)


def _assert_geometry(image: sitk.Image, array: np.ndarray, direction: np.ndarray) -> None:
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    assert np.allclose(image.GetSpacing(), SPACING, atol=1e-6)
    assert np.allclose(image.GetOrigin(), ORIGIN, atol=1e-6)
    assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), direction, atol=1e-6)
    assert image.GetMetaDataKeys() == ()


# ----------------------------------------------------------------------------------------------
# geometry and orientation


@pytest.mark.parametrize("plane", ["sag", "cor", "ax"])
def test_roundtrip_exact_geometry_and_plane(tmp_path: Path, plane: str) -> None:
    arr = _volume(seed=1)
    _write(tmp_path, arr, RH_DIRECTIONS[plane])
    (echo,) = read_series(tmp_path)
    assert (echo.echo_index, echo.number_of_echoes) == (1, 1)
    _assert_geometry(echo.image, arr, RH_DIRECTIONS[plane])
    info = detect_plane(echo.image)
    assert info.orientation == plane
    assert info.obliquity_deg < 1e-4


def test_slightly_oblique_series(tmp_path: Path) -> None:
    direction = rotation(2, 10.0) @ rotation(1, 6.0) @ RH_DIRECTIONS["cor"]
    arr = _volume(seed=2)
    _write(tmp_path, arr, direction)
    (echo,) = read_series(tmp_path)
    _assert_geometry(echo.image, arr, direction)
    info = detect_plane(echo.image)
    assert info.orientation == "cor"
    assert 5.0 < info.obliquity_deg < 15.0


def test_left_handed_direction_is_written_as_its_physical_equivalent(tmp_path: Path) -> None:
    # the shared fixtures' sagittal direction is left-handed (k = -(i x j)); DICOM stacks along i x j
    arr = _volume(seed=3)
    ref = sitk.GetImageFromArray(arr)
    ref.SetSpacing(SPACING)
    ref.SetOrigin(ORIGIN)
    ref.SetDirection(PLANE_DIRECTIONS["sag"].flatten().tolist())
    _write(tmp_path, arr, PLANE_DIRECTIONS["sag"])
    (echo,) = read_series(tmp_path)
    a, b = sitk.DICOMOrient(ref, "LPS"), sitk.DICOMOrient(echo.image, "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert detect_plane(echo.image).orientation == "sag"


#: The compressed syntaxes' encoders are optional (the 'test' extra): (module, PyPI package) each.
_ENCODER_MODULES = {
    "jpeg_ls_lossless": [("jpeg_ls", "pyjpegls")],
    "jpeg2000_lossless": [("pylibjpeg", "pylibjpeg"), ("openjpeg", "pylibjpeg-openjpeg")],
}
#: How each compressed syntax's codestream begins (SOI + SOF55 for JPEG-LS, SOC + SIZ for JPEG 2000).
_CODESTREAM_START = {
    "jpeg_ls_lossless": b"\xff\xd8\xff\xf7",
    "jpeg2000_lossless": b"\xff\x4f\xff\x51",
}


@pytest.mark.parametrize(
    "syntax, uid",
    [
        ("explicit_le", "1.2.840.10008.1.2.1"),
        ("implicit_le", "1.2.840.10008.1.2"),
        ("explicit_be", "1.2.840.10008.1.2.2"),
        ("jpeg_ls_lossless", "1.2.840.10008.1.2.4.80"),
        ("jpeg2000_lossless", "1.2.840.10008.1.2.4.90"),
        ("rle_lossless", "1.2.840.10008.1.2.5"),
    ],
)
@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_transfer_syntaxes(tmp_path: Path, syntax: str, uid: str, dtype) -> None:
    """Every syntax write_series offers is decoded back exactly by GDCM (read_series)."""
    for module, package in _ENCODER_MODULES.get(syntax, []):
        pytest.importorskip(module, reason=f"{syntax} encoding needs {package} (pip install {package})")
    # 32x32 slices: GDCM's RLE decoder refuses frames of 64 pixels or fewer, and pylibjpeg-openjpeg
    # (6 wavelet resolutions) needs both sides >= 32
    lo = -1500 if dtype == np.int16 else 0
    arr = _volume((4, 32, 32), seed=4, lo=lo, dtype=dtype)
    # extreme jumps across the whole 16-bit range
    if dtype == np.uint16:
        arr[0, 0, :4] = [0, 32768, 0, 65535]
    else:
        arr[0, 0, :4] = [-32768, 0, 32767, -32768]
    files = _write(tmp_path, arr, transfer_syntax=syntax)
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds["PixelData"].is_undefined_length == (syntax in _CODESTREAM_START or syntax == "rle_lossless")
    if syntax in _CODESTREAM_START:
        (frame,) = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
        assert frame.startswith(_CODESTREAM_START[syntax])
    (echo,) = read_series(tmp_path)
    assert echo.image.GetPixelID() == (sitk.sitkInt16 if dtype == np.int16 else sitk.sitkUInt16)
    _assert_geometry(echo.image, arr, RH_DIRECTIONS["sag"])


@pytest.mark.parametrize("syntax, needs", [("jpeg_ls_lossless", "pyjpegls"), ("jpeg2000_lossless", "pylibjpeg-openjpeg")])
def test_missing_encoder_names_the_package(tmp_path: Path, monkeypatch, syntax: str, needs: str) -> None:
    class _NoPlugins:
        available_plugins = ()

    monkeypatch.setattr(pydicom.pixels, "get_encoder", lambda uid: _NoPlugins())
    with pytest.raises(ModuleNotFoundError, match=f"{syntax}' needs .*pip install .*{needs}"):
        _write(tmp_path, transfer_syntax=syntax)
    assert not any(tmp_path.iterdir())


def test_jpeg2000_refuses_slices_below_32_pixels(tmp_path: Path) -> None:
    for module, package in _ENCODER_MODULES["jpeg2000_lossless"]:
        pytest.importorskip(module, reason=f"jpeg2000_lossless encoding needs {package} (pip install {package})")
    with pytest.raises(ValueError, match="at least 32x32 pixels.*these are 31x40"):
        _write(tmp_path, _volume((2, 31, 40), seed=4), transfer_syntax="jpeg2000_lossless")
    assert not any(tmp_path.iterdir())


def test_big_endian_file_is_really_big_endian(tmp_path: Path) -> None:
    arr = np.full((2, 4, 4), 0x0102, dtype=np.int16)
    files = _write(tmp_path, arr, transfer_syntax="explicit_be")
    raw = files[0].read_bytes()
    assert b"\x01\x02" * 16 in raw and b"\x02\x01" * 16 not in raw
    (echo,) = read_series(tmp_path)
    assert np.array_equal(sitk.GetArrayFromImage(echo.image), arr)


def test_single_file_path_reads_its_series(tmp_path: Path) -> None:
    a, b = _volume(seed=5), _volume(seed=6)
    _write(tmp_path, a, series_number=3)
    files_b = _write(tmp_path, b, series_number=4)
    (echo,) = read_series(files_b[2])
    assert np.array_equal(sitk.GetArrayFromImage(echo.image), b)
    (echo,) = read_series(files_b[0], series="4")
    assert np.array_equal(sitk.GetArrayFromImage(echo.image), b)
    with pytest.raises(DicomError, match="another series"):
        read_series(files_b[0], series=3)


# ----------------------------------------------------------------------------------------------
# series selection


def test_two_series_need_a_choice(tmp_path: Path) -> None:
    a, b = _volume(seed=7), _volume((5, 8, 8), seed=8)
    files_a = _write(tmp_path, a, series_number=2)
    _write(tmp_path, b, series_number=5)
    series = list_series(tmp_path)
    assert [s.series_number for s in series] == [2, 5]
    assert [s.num_files for s in series] == [6, 5]
    assert series[1].describe() == "series number 5: 5 files, 1 echo, 8x8"
    with pytest.raises(DicomError) as err:
        read_series(tmp_path)
    msg = str(err.value)
    assert "2 DICOM series" in msg and "series number 2" in msg and "series number 5" in msg
    assert "'series' column" in msg
    assert "\n" not in msg  # callers may show the first line only
    uid_a = pydicom.dcmread(files_a[0]).SeriesInstanceUID
    (by_uid,) = read_series(tmp_path, series=uid_a)
    assert np.array_equal(sitk.GetArrayFromImage(by_uid.image), a)
    (by_number,) = read_series(tmp_path, series="5")
    assert np.array_equal(sitk.GetArrayFromImage(by_number.image), b)
    (by_int,) = read_series(tmp_path, series=5)
    assert by_int.image.GetSize() == (8, 8, 5)
    with pytest.raises(DicomError, match="not in the folder"):
        read_series(tmp_path, series="9")


def test_series_number_shared_by_two_series(tmp_path: Path) -> None:
    _write(tmp_path / "x", _volume(seed=9), series_number=1)
    _write(tmp_path / "y", _volume(seed=10), series_number=1)
    for f in (tmp_path / "y").iterdir():
        f.rename(tmp_path / "x" / f"b_{f.name}")
    with pytest.raises(DicomError, match="share series number 1: .*SeriesInstanceUID"):
        read_series(tmp_path / "x", series=1)


# ----------------------------------------------------------------------------------------------
# multi-echo


def test_multi_echo_split_by_echo_time(tmp_path: Path, caplog) -> None:
    echoes = np.stack([_volume(seed=20 + e) for e in range(3)])
    # written out of order: echo index follows ascending echo time, not the write order
    _write(tmp_path, echoes, echo_times=[20.0, 10.0, 30.0])
    (info,) = list_series(tmp_path)
    assert info.echo_times_ms == (10.0, 20.0, 30.0)
    assert info.num_files == 18 and info.num_echoes == 3
    expected = {1: echoes[1], 2: echoes[0], 3: echoes[2]}

    every = read_series(tmp_path, echo="all")
    assert [e.echo_index for e in every] == [1, 2, 3]
    assert [e.echo_time_ms for e in every] == [10.0, 20.0, 30.0]
    for e in every:
        assert e.number_of_echoes == 3
        _assert_geometry(e.image, expected[e.echo_index], RH_DIRECTIONS["sag"])

    (third,) = read_series(tmp_path, echo=3)
    assert np.array_equal(sitk.GetArrayFromImage(third.image), expected[3])
    with caplog.at_level(logging.INFO, logger="orthodiff_nnunet"):
        (default,) = read_series(tmp_path)
    assert default.echo_index == 1 and default.echo_time_ms == 10.0
    assert np.array_equal(sitk.GetArrayFromImage(default.image), expected[1])
    assert "3 echoes" in caplog.text and "'echo' column" in caplog.text
    with pytest.raises(DicomError, match="echo 4 was asked for but the series has 3"):
        read_series(tmp_path, echo=4)
    with pytest.raises(DicomError, match="not valid"):
        read_series(tmp_path, echo=0)


# ----------------------------------------------------------------------------------------------
# validation


def test_missing_slice(tmp_path: Path) -> None:
    files = _write(tmp_path, _volume((8, 10, 12), seed=11))
    files[4].unlink()
    with pytest.raises(DicomError) as err:
        read_series(tmp_path)
    assert "slices are missing" in str(err.value) and "re-export" in str(err.value)
    assert isinstance(err.value, OrthodiffError)


def test_missing_slice_in_one_echo(tmp_path: Path) -> None:
    files = _write(tmp_path, _volume((6, 10, 12), seed=12), echo_times=[10.0, 20.0])
    files[6 + 2].unlink()  # echo 2, third slice
    assert len(read_series(tmp_path, echo=1)) == 1
    with pytest.raises(DicomError, match="echo 2 of 2: slices are missing"):
        read_series(tmp_path, echo="all")


def test_repeated_slices(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    _write(tmp_path, _volume(seed=13), series_number=1, series_uid=uid)
    _write(tmp_path, _volume(seed=14), series_number=2, series_uid=uid)
    with pytest.raises(DicomError, match="share a position"):
        read_series(tmp_path)


def test_mixed_image_sizes(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    _write(tmp_path, _volume((6, 10, 12), seed=15), series_number=1, series_uid=uid)
    _write(tmp_path, _volume((1, 16, 16), seed=16), series_number=2, series_uid=uid)
    with pytest.raises(DicomError, match=r"mix image sizes \(10x12: 6 files, 16x16: 1 files\)"):
        read_series(tmp_path)


def test_no_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(DicomError, match="no DICOM series found"):
        read_series(tmp_path)
    with pytest.raises(DicomError, match="no DICOM series found"):
        list_series(tmp_path)
    with pytest.raises(DicomError, match="does not exist"):
        read_series(tmp_path / "absent")
    with pytest.raises(DicomError, match="not a readable DICOM file"):
        read_series(tmp_path / "notes.txt")


def test_write_refuses_overwrite_and_bad_values(tmp_path: Path) -> None:
    _write(tmp_path, _volume(seed=17))
    with pytest.raises(FileExistsError):
        _write(tmp_path, _volume(seed=17))
    with pytest.raises(ValueError, match="16 bits"):
        _write(tmp_path / "b", np.full((2, 4, 4), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match="integer"):
        _write(tmp_path / "c", np.full((2, 4, 4), 0.5))


# ----------------------------------------------------------------------------------------------
# privacy


def test_no_identifier_is_logged_or_returned(tmp_path: Path, caplog) -> None:
    secrets = ["Doe^Jane", "Doe", "Jane", "MRN0012345", "19700101", "General Hospital", "20240229"]
    kw = dict(
        patient_name="Doe^Jane", patient_id="MRN0012345", birth_date="19700101", study_date="20240229",
        institution="General Hospital", series_description="knee Doe",
    )
    files = _write(tmp_path, echo_times=[9.0, 18.0, 27.0], array=_volume(seed=18), series_number=7, **kw)
    _write(tmp_path, _volume((3, 8, 8), seed=19), series_number=8, **kw)
    ds = pydicom.dcmread(files[0])
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "MRN0012345"  # really written
    uids = [ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID]
    secrets += [str(u) for u in uids]
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG):
        series = list_series(tmp_path)
        messages += [s.describe() for s in series] + [repr(s) for s in series]
        for choice in (None, "all", 2):
            with pytest.raises(DicomError) as err:
                read_series(tmp_path, echo=choice)
            messages.append(str(err.value))
        echoes = read_series(tmp_path, series=7) + read_series(tmp_path, series=7, echo="all")
        echoes += read_series(files[3], echo=2)
        messages += [repr(e) for e in echoes]
        files[4].unlink()
        with pytest.raises(DicomError) as err:
            read_series(tmp_path, series=str(ds.SeriesInstanceUID), echo="all")
        messages.append(str(err.value))
    assert len(echoes) == 5
    assert caplog.records, "expected some log records to check"
    text = caplog.text + "\n".join(messages)
    for s in secrets:
        assert s not in text, f"identifying value {s!r} leaked"
    for e in echoes:
        assert e.image.GetMetaDataKeys() == ()


def test_through_the_site_converter(tmp_path: Path, caplog) -> None:
    """A DICOM multi-echo row with echo=all becomes one case per echo; no identifier reaches the outputs."""
    import gzip

    from conftest import write_manifest

    from orthodiff_nnunet.api import convert

    site = tmp_path / "site"
    echoes = np.stack([_volume((6, 12, 12), seed=30 + e) for e in range(3)])
    files = _write(site / "exam1", echoes, echo_times=[10.0, 20.0, 30.0], patient_name="Doe^Jane",
                   patient_id="MRN0012345", birth_date="19700101", institution="General Hospital")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    manifest = write_manifest(site / "manifest.csv", [
        {"case_id": "EX1", "patient_id": "PAT1", "site": "SiteD", "field_strength": "3", "image": "exam1",
         "echo": "all"},
    ])
    raw = tmp_path / "raw"
    with caplog.at_level(logging.DEBUG):
        result = convert(manifest, 700, "Dcm", raw=raw, num_processes=1)
    assert set(result.datasets) == {"sag"} and result.num_cases["sag"] == 3
    text = caplog.text + result.summary()
    for path in raw.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            text += (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("latin-1")
    for s in ("Doe^Jane", "MRN0012345", "19700101", "General Hospital", uid):
        assert s not in text


# ----------------------------------------------------------------------------------------------
# real data (../shared/data)


@pytest.mark.realdata
def test_real_dess_sagittal(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "pykneer_dess_sag_3t" / "echo1"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    (info,) = list_series(folder)
    assert info.num_files == 80 and (info.rows, info.cols) == (512, 512)
    (echo,) = read_series(folder)
    image = echo.image
    assert image.GetSize() == (512, 512, 80)
    assert np.allclose(image.GetSpacing(), (0.3125, 0.3125, 1.5), atol=1e-3)
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetMetaDataKeys() == ()
    plane = detect_plane(image)
    assert plane.orientation == "sag" and plane.obliquity_deg < 0.5


@pytest.mark.realdata
def test_real_multi_echo_big_endian(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "pymskt_mese_t2_sag_3t"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    first = sorted(folder.glob("*.dcm"))[0]
    assert pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    (info,) = list_series(folder)
    assert info.num_files == 192 and info.num_echoes == 8
    echoes = read_series(folder, echo="all")
    assert len(echoes) == 8
    times = [e.echo_time_ms for e in echoes]
    assert times == sorted(times) and len(set(times)) == 8
    assert [e.echo_index for e in echoes] == list(range(1, 9))
    obliquities = []
    for e in echoes:
        assert e.number_of_echoes == 8
        assert e.image.GetSize() == (256, 256, 24)
        assert np.allclose(e.image.GetSpacing(), (0.625, 0.625, 4.0), atol=1e-3)
        plane = detect_plane(e.image)
        assert plane.orientation == "sag"
        obliquities.append(plane.obliquity_deg)
    # slightly oblique: about 8.4 degrees from the L-R axis, the same for every echo
    assert 1.0 < obliquities[0] < 20.0
    assert np.allclose(obliquities, obliquities[0])
    # echoes differ (T2 decay): later echoes are darker on average
    means = [float(sitk.GetArrayViewFromImage(e.image).mean()) for e in echoes]
    assert means[0] > means[-1]
