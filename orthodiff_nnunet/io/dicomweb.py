"""A PACS over DICOMweb: query (QIDO-RS), retrieve into a local cache (WADO-RS), store (STOW-RS).

The HTTP side is ``dicomweb-client``; this module adds what a site needs around it:

* :func:`query_series` lists the series of the server (optionally of some studies and of one
  modality) with the attributes ``orthodiff scan`` decides by: modality, series number and
  description, number of instances, and the acquisition plane from ImageOrientationPatient (asked
  at series level, else from one instance of the series);
* :func:`retrieve_series` copies chosen series into a cache folder, one folder per study and
  series (``<cache>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``). Every file is
  written under a temporary name in ``<cache>/.partial-*`` (one folder per run) and renamed into place, so a killed run
  leaves no half-written file in a series folder. A series whose folder holds every instance the
  server lists gets a marker (``.orthodiff_series.json``) and is never fetched again; an
  interrupted series fetches only the instances it lacks. Instances are asked for in the transfer
  syntax the server stores them in (no transcoding);
* :func:`store_instances` sends files or datasets to the server (one STOW-RS request per batch)
  and checks the server's answer instance by instance.

Privacy: the cache holds the original instances (names, ids, UIDs): it belongs to the site like
the PACS export it replaces. Logs and error messages show the server as ``scheme://host:port/path``
(never user, password, token or query), and series by number, modality and instance count only:
no UID, name, description or date. ``dicomweb-client`` logs UIDs at INFO and request headers
(including ``Authorization``) at DEBUG, so its logger is held at WARNING once a client is made here.

Credentials: a URL ``https://user:password@host/...``, the ``username``/``password``/``token``
arguments, or the environment variables ``ORTHODIFF_DICOMWEB_USER``, ``ORTHODIFF_DICOMWEB_PASSWORD``
and ``ORTHODIFF_DICOMWEB_TOKEN`` (a bearer token), in this order.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import pydicom
    from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)

__all__ = [
    "DicomwebError",
    "RemoteSeries",
    "RetrieveResult",
    "StoreResult",
    "redact_url",
    "connect",
    "query_studies",
    "query_series",
    "retrieve_series",
    "store_instances",
    "store_files",
    "fetch_to_cache",
    "series_folder",
    "MARKER_NAME",
]

#: Completion marker of a cached series folder (hidden: folder listings of DICOM readers skip it).
MARKER_NAME = ".orthodiff_series.json"
#: Prefix of the per-run folder where files are written before they are renamed into their series
#: folder (hidden, same file system). Those of killed runs are removed after PARTIAL_STALE_S.
PARTIAL_DIR = ".partial-"
PARTIAL_STALE_S = 24 * 3600
#: Environment variables read for credentials when none are given otherwise.
ENV_USER, ENV_PASSWORD, ENV_TOKEN = "ORTHODIFF_DICOMWEB_USER", "ORTHODIFF_DICOMWEB_PASSWORD", "ORTHODIFF_DICOMWEB_TOKEN"

# DICOM JSON tags (QIDO-RS answers)
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _SERIES_NUMBER, _SERIES_DESCRIPTION = "00080060", "00200011", "0008103E"
_NUM_INSTANCES, _ORIENTATION = "00201209", "00200037"
_NUM_STUDY_SERIES, _MODALITIES_IN_STUDY = "00201206", "00080061"
_SERIES_FIELDS = (_MODALITY, _SERIES_NUMBER, _SERIES_DESCRIPTION, _NUM_INSTANCES, _ORIENTATION)
#: Failed SOP Sequence and its Failure Reason (STOW-RS answer, PS3.18 table 10.5.3-1).
_FAILED_SOP_SEQUENCE, _FAILURE_REASON = "FailedSOPSequence", "FailureReason"
#: Ask for instances as stored (no transcoding to Explicit VR Little Endian).
_AS_STORED = (("application/dicom", "*"),)
#: The fix to propose for an HTTP status, where one is known.
_HTTP_HINTS = {
    400: "the server refused the request as malformed",
    401: f"the server wants credentials: put them in the URL (https://user:password@host/...) or in "
         f"{ENV_USER}/{ENV_PASSWORD} (or a bearer token in {ENV_TOKEN})",
    403: "the credentials given are not allowed to do this on the server",
    404: "check the URL: it must end at the DICOMweb root (e.g. http://host:8042/dicom-web)",
    409: "the server refused the instances (conflict): they may exist there already with other content",
    413: "the request is larger than the server accepts: store fewer instances per request (batch size)",
    415: "the server does not accept this media type: is the URL a DICOMweb (STOW-RS) endpoint?",
}


class DicomwebError(OrthodiffError):
    """A DICOMweb request failed; the message names the server (without credentials), what was
    asked, the HTTP status where there was one, and what to do."""


# ----------------------------------------------------------------------------------------------
# connection


def redact_url(url: str) -> str:
    """``url`` as it may be shown: scheme, host, port and path; user, password, query and fragment dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """The URL without user info, and the user and password it held (percent-decoded)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    return (urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)),
            unquote(parts.username or ""), unquote(parts.password or "") if parts.password is not None else None)


def _quiet_client_loggers() -> None:
    # dicomweb-client logs UIDs at INFO and headers (Authorization) at DEBUG; urllib3 logs request
    # paths (UIDs) at DEBUG. Neither may reach a site's logs.
    for name in ("dicomweb_client", "urllib3"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def connect(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
    timeout_s: float = 60.0,
    max_attempts: int = 5,
) -> DICOMwebClient:
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url``.

    Args:
        url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``; may carry ``user:password@``.
        username, password: HTTP basic authentication (default: from the URL, else the environment).
        token: a bearer token (default: ``$ORTHODIFF_DICOMWEB_TOKEN``).
        timeout_s: seconds to wait for the server to answer a request (not the whole transfer).
        max_attempts: tries of a request that cannot connect or gets HTTP 408, 429 or 503, with
            exponential waits between them (2, 4, 8, 16 s: a restarting PACS has time to come back).

    Raises:
        DicomwebError: the URL is not an http(s) URL.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    plain, url_user, url_password = _split_credentials(url)
    scheme = urlsplit(plain).scheme
    if scheme not in ("http", "https") or not urlsplit(plain).hostname:
        raise DicomwebError(
            f"{redact_url(url) or 'the DICOMweb URL'} is not an http(s) URL; give the server's DICOMweb root, "
            "e.g. http://pacs:8042/dicom-web"
        )
    username = username or url_user or os.environ.get(ENV_USER) or None
    password = password if password is not None else (url_password if url_password is not None
                                                      else os.environ.get(ENV_PASSWORD))
    token = token or os.environ.get(ENV_TOKEN) or None
    session = requests.Session()
    if username:
        session.auth = (username, password or "")
    headers = {"Authorization": f"Bearer {token}"} if token and not username else None
    _quiet_client_loggers()
    client = DICOMwebClient(plain.rstrip("/"), session=session, headers=headers, timeout=timeout_s)
    client.set_http_retry_params(retry=max_attempts > 1, max_attempts=max(1, max_attempts))
    client.orthodiff_server = redact_url(plain)  # type: ignore[attr-defined]  # for messages
    return client


def _server(client: DICOMwebClient) -> str:
    return getattr(client, "orthodiff_server", None) or redact_url(client.base_url)


def _client(client_or_url: DICOMwebClient | str) -> DICOMwebClient:
    return connect(client_or_url) if isinstance(client_or_url, str) else client_or_url


def _failure(client: DICOMwebClient, what: str, exc: BaseException) -> DicomwebError:
    """A message for a failed request: the server, what was asked, the HTTP status and the fix.

    ``str(exc)`` is never used: requests puts the full URL (UIDs, credentials) into its messages.
    """
    import requests

    server = _server(client)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status, reason = exc.response.status_code, exc.response.reason or ""
        hint = _HTTP_HINTS.get(status, "the server failed; its own log says why" if status >= 500 else "")
        return DicomwebError(f"DICOMweb server {server}: {what} failed with HTTP {status} {reason}".rstrip()
                             + (f"; {hint}" if hint else ""))
    if isinstance(exc, requests.Timeout):
        return DicomwebError(f"DICOMweb server {server}: {what} timed out; is the server overloaded? try again later")
    if isinstance(exc, requests.ConnectionError):
        return DicomwebError(f"DICOMweb server {server}: {what} failed: the server cannot be reached "
                             "(check the host, the port and that the server runs)")
    return DicomwebError(f"DICOMweb server {server}: {what} failed ({type(exc).__name__})")


def _request(client: DICOMwebClient, what: str, call, *args, **kwargs):
    import requests

    try:
        return call(*args, **kwargs)
    except requests.RequestException as exc:  # an OSError subclass: local file errors are not caught here
        raise _failure(client, what, exc) from None


# ----------------------------------------------------------------------------------------------
# query


#: Results asked for per QIDO-RS request.
QIDO_PAGE = 1000


def _search_all(client: DICOMwebClient, what: str, search, key: str, **kwargs) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS search, page by page (``offset``), deduplicated on ``key``.

    Not ``get_remaining=True`` of dicomweb-client: that loop ends only on an empty page, and some
    servers ignore ``offset`` for some keys (Orthanc 1.10 with ``ModalitiesInStudy``), which makes it
    endless. Here a page that brings nothing new ends the search as well.
    """
    results: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = _request(client, what, search, limit=QIDO_PAGE, offset=offset, **kwargs)
        new = {str(_value(i, key)): i for i in page if _value(i, key) and str(_value(i, key)) not in results}
        if not new:
            return list(results.values())
        results.update(new)
        offset += len(page)


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


def _int(value: Any) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def plane_from_orientation(iop: Sequence[float] | None) -> str | None:
    """``sag``, ``cor`` or ``ax`` from ImageOrientationPatient (the patient axis nearest the slice
    normal), or None when it is absent or malformed. A hint only: ``convert`` decides from the
    geometry of the whole series and refuses oblique ones."""
    if iop is None or len(iop) != 6:
        return None
    try:
        row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    except (TypeError, ValueError):
        return None
    normal = np.cross(row, col)
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-6:
        return None
    return ("sag", "cor", "ax")[int(np.argmax(np.abs(normal)))]


@dataclass(frozen=True)
class RemoteSeries:
    """One series on the server, as needed to choose it. UIDs and the description are kept for
    selection and the manifest; they are hidden from ``repr`` and never logged."""

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str
    series_number: int | None
    num_instances: int | None
    orientation: str | None  # sag / cor / ax from ImageOrientationPatient, None: unknown
    image_orientation: tuple[float, ...] | None = field(default=None, repr=False)
    description: str = field(default="", repr=False)

    def describe(self) -> str:
        """Non-identifying description for messages, e.g. ``series number 3 (MR, 24 instances, sag)``."""
        number = f"series number {self.series_number}" if self.series_number is not None else "series without number"
        count = f"{self.num_instances} instances" if self.num_instances is not None else "instances unknown"
        return f"{number} ({', '.join(x for x in (self.modality or 'modality unknown', count, self.orientation) if x)})"


@dataclass(frozen=True)
class RemoteStudy:
    """One study on the server (UID hidden from ``repr``)."""

    study_uid: str = field(repr=False)
    num_series: int | None
    modalities: tuple[str, ...]


def query_studies(client_or_url: DICOMwebClient | str, *, search_filters: dict[str, Any] | None = None,
                  modality: str | None = None) -> list[RemoteStudy]:
    """Studies of the server (QIDO-RS), optionally those holding ``modality`` (ModalitiesInStudy).

    Args:
        search_filters: further QIDO-RS matching keys, e.g. ``{"StudyDate": "20240101-20241231"}``.
    """
    client = _client(client_or_url)
    filters = dict(search_filters or {})
    if modality:
        filters["ModalitiesInStudy"] = modality
    found = _search_all(client, "the study query (QIDO-RS)", client.search_for_studies, _STUDY_UID,
                        fields=[_NUM_STUDY_SERIES, _MODALITIES_IN_STUDY], search_filters=filters or None)
    studies = [RemoteStudy(str(_value(s, _STUDY_UID)), _int(_value(s, _NUM_STUDY_SERIES)),
                           tuple(str(m) for m in _values(s, _MODALITIES_IN_STUDY)))
               for s in found if _value(s, _STUDY_UID)]
    log.info("%s: %d stud%s found", _server(client), len(studies), "y" if len(studies) == 1 else "ies")
    return studies


def query_series(
    client_or_url: DICOMwebClient | str,
    *,
    study_uids: Sequence[str] | None = None,
    modality: str | None = "MR",
    search_filters: dict[str, Any] | None = None,
    max_series: int | None = None,
) -> list[RemoteSeries]:
    """Series of the server (QIDO-RS) with modality, number, description, instance count and plane.

    Args:
        client_or_url: a client from :func:`connect`, or the DICOMweb root URL.
        study_uids: only these studies (default: every study the server lists).
        modality: only this modality (default ``MR``; None: all).
        search_filters: further QIDO-RS matching keys, e.g. ``{"StudyDate": "20240101-20240131"}``.
        max_series: refuse more matching series than this (a whole hospital PACS is not what a site
            means to copy), before any per-series request.

    Returns:
        The series, ordered by study, then series number.

    Raises:
        DicomwebError: the server cannot be reached or refuses the query.
    """
    client = _client(client_or_url)
    filters = dict(search_filters or {})
    if modality:
        filters["Modality"] = modality
    what = "the series query (QIDO-RS)"
    found: list[dict[str, Any]] = []
    if study_uids:
        for uid in study_uids:
            found += _search_all(client, what, client.search_for_series, _SERIES_UID, study_instance_uid=uid,
                                 fields=list(_SERIES_FIELDS), search_filters=filters or None)
    else:
        found = _search_all(client, what, client.search_for_series, _SERIES_UID, fields=list(_SERIES_FIELDS),
                            search_filters=filters or None)
    found = [i for i in found if _value(i, _STUDY_UID) and _value(i, _SERIES_UID)]
    if max_series is not None and len(found) > max_series:
        raise DicomwebError(
            f"DICOMweb server {_server(client)}: {len(found)} series match, more than the {max_series} allowed; "
            "narrow the query (--study UID, --study-date YYYYMMDD-YYYYMMDD, --modality) or raise --max-series")
    series: list[RemoteSeries] = []
    for item in found:
        study, uid = _value(item, _STUDY_UID), _value(item, _SERIES_UID)
        iop = _values(item, _ORIENTATION)
        if len(iop) != 6:  # not a series-level attribute on every server: ask one instance
            inst = _request(client, "the instance query (QIDO-RS)", client.search_for_instances,
                            study_instance_uid=study, series_instance_uid=uid, fields=[_ORIENTATION], limit=1)
            iop = _values(inst[0], _ORIENTATION) if inst else []
        iop_t = tuple(float(v) for v in iop) if len(iop) == 6 else None
        series.append(RemoteSeries(
            study_uid=str(study), series_uid=str(uid), modality=str(_value(item, _MODALITY) or ""),
            series_number=_int(_value(item, _SERIES_NUMBER)), num_instances=_int(_value(item, _NUM_INSTANCES)),
            orientation=plane_from_orientation(iop_t), image_orientation=iop_t,
            description=str(_value(item, _SERIES_DESCRIPTION) or ""),
        ))
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30))
    log.info("%s: %d series found%s", _server(client), len(series), f" (modality {modality})" if modality else "")
    return series


# ----------------------------------------------------------------------------------------------
# retrieve


def _safe_name(uid: str) -> str:
    """A UID as a file name: UIDs are digits and dots; anything else (a non-conformant server) is quoted."""
    name = quote(uid, safe="0123456789.")
    if name in ("", ".", ".."):
        raise DicomwebError("the server returned an empty or invalid UID; this instance cannot be cached")
    return name


def series_folder(cache: Path, series: RemoteSeries) -> Path:
    """The cache folder of a series: ``<cache>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
    return Path(cache) / _safe_name(series.study_uid) / _safe_name(series.series_uid)


@dataclass
class RetrieveResult:
    """What :func:`retrieve_series` did: the series folders (in the order asked), and counts."""

    folders: list[Path]
    series_fetched: int = 0
    series_cached: int = 0  # complete in the cache already: not fetched
    instances_fetched: int = 0

    def summary(self) -> str:
        return (f"{len(self.folders)} series in the cache: {self.series_fetched} fetched "
                f"({self.instances_fetched} instances), {self.series_cached} complete already")


def _is_complete(folder: Path, series: RemoteSeries) -> bool:
    """Whether the marker of ``folder`` lists files that all exist, and at least as many instances as the
    server's query counts now (a series still arriving on the PACS is fetched again for its new instances)."""
    marker = folder / MARKER_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = list(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if series.num_instances is not None and series.num_instances > len(files):
        return False
    return bool(files) and all((folder / name).is_file() for name in files)


def _write_instance(ds: pydicom.Dataset, folder: Path, partial: Path) -> Path:
    """``ds`` written to a temporary file in ``partial`` (flushed to disk, owner-only permissions, as
    ``tempfile`` creates it), then renamed to ``folder/<SOPInstanceUID>.dcm``."""
    import pydicom

    path = folder / f"{_safe_name(str(ds.SOPInstanceUID))}.dcm"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue(), mode=0o600, tmp_dir=partial)
    return path


def _instance_uids(client: DICOMwebClient, series: RemoteSeries) -> list[str]:
    found = _search_all(client, f"the instance query (QIDO-RS) of {series.describe()}", client.search_for_instances,
                        _SOP_UID, study_instance_uid=series.study_uid, series_instance_uid=series.series_uid,
                        fields=[_SOP_UID])
    return sorted({str(_value(i, _SOP_UID)) for i in found if _value(i, _SOP_UID)})


def retrieve_series(
    client_or_url: DICOMwebClient | str,
    series: Sequence[RemoteSeries],
    cache: Path,
    *,
    show_progress: bool = True,
) -> RetrieveResult:
    """Copy ``series`` from the server into ``cache`` (WADO-RS), resumably and atomically.

    A series whose folder is complete (its marker lists files that all exist, as many as the server
    counts now) is not fetched again. Otherwise the server's instance list (QIDO-RS) says what is missing: a series with
    nothing cached is fetched in one WADO-RS request (streamed), a partly cached one instance by
    instance. Instances are written as the server stores them (no transcoding); files of the
    folder that the server no longer lists are left alone (and then read by ``scan``).

    Args:
        client_or_url: a client from :func:`connect`, or the DICOMweb root URL.
        series: what to fetch (from :func:`query_series`).
        cache: the cache folder (created). It holds identifying data: keep it at the site.
        show_progress: a tqdm bar over the instances to fetch (rate and ETA).

    Raises:
        DicomwebError: a request failed (the series is named by number; what was written stays
            and is reused by the next run), or the server returned fewer instances than it lists.
    """
    from tqdm import tqdm

    client = _client(client_or_url)
    cache = Path(cache)
    result = RetrieveResult(folders=[])
    todo: list[tuple[RemoteSeries, Path]] = []
    for s in series:
        folder = series_folder(cache, s)
        result.folders.append(folder)
        if _is_complete(folder, s):
            result.series_cached += 1
            log.debug("%s: complete in the cache, not fetched", s.describe())
        elif (s, folder) not in todo:
            todo.append((s, folder))
    if not todo:
        log.info("%s: all %d series complete in the cache", _server(client), len(series))
        return result
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(cache)
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL_DIR, dir=cache))
    total = sum(s.num_instances or 0 for s, _ in todo) or None
    log.info("%s: fetching %d series (%s instances) into the cache; %d complete already",
             _server(client), len(todo), total if total is not None else "unknown", result.series_cached)
    bar = tqdm(total=total, desc="DICOMweb retrieve", unit="instance", disable=not show_progress)
    try:
        for s, folder in todo:
            _fetch_series(client, s, folder, partial, result, bar)
    finally:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    log.info("%s: %s", _server(client), result.summary())
    return result


def _remove_stale_partials(cache: Path) -> None:
    """Remove the temporary folders of killed runs (older than ``PARTIAL_STALE_S``: not of one running now)."""
    now = time.time()
    for stale in cache.glob(f"{PARTIAL_DIR}*"):
        try:
            if now - stale.stat().st_mtime > PARTIAL_STALE_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _fetch_series(client: DICOMwebClient, s: RemoteSeries, folder: Path, partial: Path, result: RetrieveResult,
                  bar) -> None:
    """Fetch the instances of ``s`` missing from ``folder``, check that all came, and mark the folder complete.

    A series with nothing cached comes in one streamed WADO-RS request, a partly cached one instance
    by instance. ``result`` counts the instances and the series; ``bar`` advances per instance.

    Raises:
        DicomwebError: a request failed, the server lists no instance, or some did not come back.
    """
    expected = _instance_uids(client, s)
    if not expected:
        raise DicomwebError(f"DICOMweb server {_server(client)}: {s.describe()} lists no instances; "
                            "it may have been deleted since the query: run the command again")
    folder.mkdir(parents=True, exist_ok=True)
    names = {uid: f"{_safe_name(uid)}.dcm" for uid in expected}
    missing = [uid for uid in expected if not (folder / names[uid]).is_file()]
    what = f"the retrieval (WADO-RS) of {s.describe()}"
    if len(missing) == len(expected):
        stream = iter(_request(client, what, client.iter_series, s.study_uid, s.series_uid,
                               media_types=_AS_STORED))
        while (ds := _request(client, what, next, stream, None)) is not None:  # the stream's errors
            _write_instance(ds, folder, partial)  # a local write error (disk full) stays an OSError
            result.instances_fetched += 1
            bar.update(1)
    else:
        for uid in missing:
            ds = _request(client, what, client.retrieve_instance, s.study_uid, s.series_uid, uid,
                          media_types=_AS_STORED)
            _write_instance(ds, folder, partial)
            result.instances_fetched += 1
            bar.update(1)
    still = [uid for uid in expected if not (folder / names[uid]).is_file()]
    if still:
        raise DicomwebError(
            f"DICOMweb server {_server(client)}: {s.describe()}: {len(still)} of {len(expected)} instances "
            "did not come back from the retrieval (WADO-RS); run the command again (what came is kept)"
        )
    atomic_write_json(folder / MARKER_NAME, {"files": sorted(names.values()), "instances": len(expected),
                                             "modality": s.modality, "series_number": s.series_number})
    result.series_fetched += 1


def fetch_to_cache(
    url_or_client: DICOMwebClient | str,
    cache: Path,
    *,
    study_uids: Sequence[str] | None = None,
    modality: str | None = "MR",
    search_filters: dict[str, Any] | None = None,
    max_series: int | None = None,
    show_progress: bool = True,
) -> tuple[list[RemoteSeries], RetrieveResult]:
    """Query the series of the server (:func:`query_series`) and retrieve all of them into ``cache``.

    The cache is then a folder like a PACS export (one folder per series) for ``orthodiff scan``.

    Raises:
        DicomwebError: nothing matches, or a request failed.
    """
    client = _client(url_or_client)
    series = query_series(client, study_uids=study_uids, modality=modality, search_filters=search_filters,
                          max_series=max_series)
    if not series:
        what = f"no {modality} series" if modality else "no series"
        raise DicomwebError(f"DICOMweb server {_server(client)}: {what} found"
                            + (" in the studies asked for" if study_uids else "")
                            + (f" matching {', '.join(sorted(search_filters))}" if search_filters else "")
                            + "; check the URL, the study UIDs, the dates and the modality")
    return series, retrieve_series(client, series, cache, show_progress=show_progress)


# ----------------------------------------------------------------------------------------------
# store


@dataclass
class StoreResult:
    """What :func:`store_instances` stored: the instances and the requests it took."""

    instances: int
    requests: int


def store_instances(
    client_or_url: DICOMwebClient | str,
    datasets: Iterable[pydicom.Dataset],
    *,
    batch_size: int = 64,
) -> StoreResult:
    """Store DICOM datasets on the server (STOW-RS), ``batch_size`` instances per request.

    The server's answer is checked: a Failed SOP Sequence (or an HTTP error) is an error that
    names the server, the HTTP status or failure reasons, and how many instances were stored before.

    Raises:
        DicomwebError: a request failed or the server refused instances.
    """
    client = _client(client_or_url)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    stored = requests_made = 0
    batch: list[pydicom.Dataset] = []

    def flush() -> None:
        nonlocal stored, requests_made
        if not batch:
            return
        what = f"storing {len(batch)} instance(s) (STOW-RS)" + (f" after {stored} stored" if stored else "")
        answer = _request(client, what, client.store_instances, batch)
        requests_made += 1
        failed = answer.get(_FAILED_SOP_SEQUENCE) if answer is not None else None
        if failed:
            reasons = sorted({f"0x{int(item.get(_FAILURE_REASON, 0)):04X}" for item in failed})
            raise DicomwebError(
                f"DICOMweb server {_server(client)}: {what}: the server refused {len(failed)} of {len(batch)} "
                f"instance(s) (failure reason {', '.join(reasons)}: 0xA7xx out of resources, 0xA9xx/0xC000 "
                "data set does not match the SOP class or cannot be processed, 0x0110 processing failure); "
                "its own log says more"
            )
        stored += len(batch)
        batch.clear()

    for n, ds in enumerate(datasets, 1):
        meta = getattr(ds, "file_meta", None)
        lacks = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
        if meta is None or not meta.get("TransferSyntaxUID"):
            lacks.append("file meta TransferSyntaxUID")
        if lacks:
            raise DicomwebError(
                f"instance {n} to store lacks {', '.join(lacks)}; a DICOM object needs them to be stored "
                f"({stored} instance(s) stored before it): write it as a DICOM file (pydicom: enforce_file_format=True)"
            )
        batch.append(ds)
        if len(batch) >= batch_size:
            flush()
    flush()
    log.info("%s: %d instance(s) stored in %d request(s)", _server(client), stored, requests_made)
    return StoreResult(instances=stored, requests=requests_made)


def store_files(client_or_url: DICOMwebClient | str, paths: Sequence[Path], *, batch_size: int = 64) -> StoreResult:
    """Store DICOM files (e.g. the DICOM SEG objects ``predict seg --dicom-seg`` wrote) on the server.

    Raises:
        DicomwebError: a file is not DICOM (named), or storing failed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    def read() -> Iterable[pydicom.Dataset]:
        for path in paths:
            try:
                yield pydicom.dcmread(path)
            except (InvalidDicomError, OSError) as exc:
                raise DicomwebError(f"{Path(path).name} cannot be read as DICOM ({type(exc).__name__}); "
                                    "nothing after it was stored: replace or remove the file and store again") from None

    if not paths:
        raise DicomwebError("no DICOM files to store")
    return store_instances(client_or_url, read(), batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# command line: `orthodiff scan --dicomweb URL` and `orthodiff predict seg --dicom-seg-to URL`

#: Default cache folder name, beside the manifest (site-private like the manifest).
DEFAULT_CACHE_NAME = "dicomweb_cache"
#: Default largest number of series one ``scan --dicomweb`` copies.
DEFAULT_MAX_SERIES = 2000


def add_scan_arguments(parser) -> None:
    """The DICOMweb options of ``orthodiff scan`` (an argparse parser or group)."""
    g = parser.add_argument_group("a PACS over DICOMweb instead of an export folder")
    g.add_argument("--dicomweb", metavar="URL", default=None,
                   help="query this DICOMweb server (its root, e.g. http://pacs:8042/dicom-web; credentials in the "
                        f"URL or in ${ENV_USER}/${ENV_PASSWORD}, or a bearer token in ${ENV_TOKEN}), retrieve the "
                        "series into --cache and scan the cache as an export folder")
    g.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help=f"with --dicomweb: the local copy, one folder per study and series (default: "
                        f"{DEFAULT_CACHE_NAME}/ beside the manifest). It holds the original instances: keep it at "
                        "the site. Series complete in it are not fetched again")
    g.add_argument("--study", action="append", default=None, metavar="UID",
                   help="with --dicomweb: only this study (StudyInstanceUID; repeat for several; default: all)")
    g.add_argument("--modality", default="MR", help="with --dicomweb: only series of this modality (default MR)")
    g.add_argument("--study-date", default=None, metavar="YYYYMMDD[-YYYYMMDD]",
                   help="with --dicomweb: only studies of this date or date range (DICOM range matching)")
    g.add_argument("--max-series", type=int, default=DEFAULT_MAX_SERIES, metavar="N",
                   help=f"with --dicomweb: refuse a query matching more series than this (default "
                        f"{DEFAULT_MAX_SERIES}: narrow it with --study or --study-date)")


def check_cache_location(cache: Path) -> None:
    """Refuse a cache inside ``$nnUNet_raw``, ``$nnUNet_preprocessed`` or ``$nnUNet_results``: it holds the
    original instances with the patients' identifiers, while those folders are shared."""
    target = Path(cache).expanduser().absolute().resolve()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            continue
        root = Path(os.environ[var]).expanduser().absolute().resolve()
        if target == root or root in target.parents:
            raise DicomwebError(
                f"the DICOMweb cache {target} would lie inside ${var} ({root}): it holds the original instances "
                "with the patients' identifiers and must stay at the site, outside the nnU-Net folders; "
                "give --cache DIR elsewhere (e.g. beside the manifest)")


def cache_for_scan(args, manifest: Path, *, show_progress: bool = True) -> tuple[Path, list[Path]] | None:
    """For ``orthodiff scan --dicomweb``: query and retrieve into the cache.

    Returns:
        None without ``--dicomweb``; else the cache folder to scan and the files of it that the scan
        must leave out: the completion markers and the series of earlier queries not asked for now.
    """
    url = getattr(args, "dicomweb", None)
    if not url:
        for opt in ("cache", "study", "study_date"):
            if getattr(args, opt, None):
                flag = "--" + opt.replace("_", "-")
                raise DicomwebError(f"{flag} applies to --dicomweb URL only: add it or leave {flag} out")
        return None
    cache = Path(args.cache) if args.cache else Path(manifest).absolute().parent / DEFAULT_CACHE_NAME
    check_cache_location(cache)
    filters = {"StudyDate": args.study_date} if args.study_date else None
    series, result = fetch_to_cache(url, cache, study_uids=args.study, modality=args.modality or None,
                                    search_filters=filters, max_series=args.max_series,
                                    show_progress=show_progress)
    wanted = {f.resolve() for f in result.folders}
    exclude = [p for p in cache.rglob("*") if p.is_file()
               and (p.name == MARKER_NAME or p.parent.resolve() not in wanted)]
    others = {p.parent for p in exclude if p.name != MARKER_NAME}
    if others:
        log.info("%d series cached by earlier queries are left out of this scan", len(others))
    return cache, exclude


def add_store_argument(parser) -> None:
    """``--dicom-seg-to URL`` of ``orthodiff predict seg``."""
    parser.add_argument("--dicom-seg-to", metavar="URL", default=None,
                        help="with --dicom-seg: also store the written DICOM SEG objects on this DICOMweb server "
                             "(STOW-RS; its root, e.g. http://pacs:8042/dicom-web; credentials as for scan --dicomweb)")


def check_server(url: str) -> DICOMwebClient:
    """Connect and ask one study (QIDO-RS): a wrong URL, server or credentials fail here, before minutes
    of prediction, with the message of :func:`_failure`. Returns the client."""
    client = connect(url)
    _request(client, "a test query (QIDO-RS)", client.search_for_studies, limit=1)
    return client
