"""Pseudonyms for case and patient ids.

Outputs never carry source identifiers. A pseudonym is a keyed hash (HMAC-SHA256) of the source
id under a secret key kept *outside* the datasets (default ``<nnUNet_raw>/.orthodiff/pseudonym.key``):

* the same key gives the same pseudonym on every run, so re-running is idempotent and adding
  cases leaves the others' names unchanged;
* without the key, a pseudonym cannot be linked back to a (guessable) medical record number,
  which a plain hash could by trying every number.

Keep the key private and do not share it with the datasets. A key file mapping pseudonyms back to
source ids is written only on request (``write_key_file``), never inside a dataset.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
import tempfile
from pathlib import Path

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import atomic_write_bytes

_HEX_CHARS = 10  # 40 bits: collisions are checked, and are negligible for site-sized datasets


def load_or_create_key(path: Path, create: bool = True) -> bytes:
    """Read the secret key, or create it (mode 0600) when it does not exist and ``create``."""
    key, new = read_or_new_key(path)
    if new and create:
        store_new_key(path, key)
    return key  # without ``create``: an ephemeral key, nothing written


def read_or_new_key(path: Path) -> tuple[bytes, bool]:
    """The key stored at ``path``, or a fresh random one that is *not yet written*.

    A conversion keeps a fresh key in memory until it has checked every series and writes it
    (:func:`store_new_key`) only when it goes on to write datasets: a refused conversion leaves
    no key behind.

    Returns:
        ``(key, is_new)``.
    """
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < 16:
            raise OrthodiffError(f"pseudonym key {path} is too short or damaged; restore it from a backup")
        return key, False
    return secrets.token_bytes(32), True


def store_new_key(path: Path, key: bytes) -> None:
    """Write a new key (mode 0600), never replacing an existing one.

    The key is written under a temporary name and hard-linked to ``path``, which fails when
    ``path`` appeared meanwhile (another conversion sharing the key file created it): replacing it
    would silently change every pseudonym of that conversion.

    Raises:
        OrthodiffError: ``path`` exists (with another key) by now.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            if read_or_new_key(path)[0] != key:
                raise OrthodiffError(
                    f"the pseudonym key {path} was created by another conversion while this one ran; "
                    "run this conversion again (it will use that key)"
                ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def pseudonym(key: bytes, kind: str, source_id: str, prefix: str = "") -> str:
    """Stable, non-reversible pseudonym ``<prefix><10 hex>`` of ``source_id`` for ``kind``."""
    digest = hmac.new(key, f"{kind}\x1f{source_id}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:_HEX_CHARS]}"


def write_key_file(path: Path, rows: list[dict[str, str]], forbidden_root: Path | None = None) -> None:
    """Write the pseudonym -> source id table (CSV), one row per exam, refusing any place inside ``forbidden_root``.

    Args:
        path: the CSV to write.
        rows: dicts with keys ``pseudonym`` (the exam's), ``case_id``, ``patient_pseudonym``, ``patient_id``,
            ``site`` and optionally ``cases`` (the exam's output cases, e.g. ``KneeA_3f0c9e1a2b (sag)``) and
            ``series`` (the manifest's image entries it covers). Rows of the same exam (one per series)
            are merged into one, their ``cases`` and ``series`` joined with ``"; "``.
        forbidden_root: a folder the key file must not be inside (the nnU-Net raw folder).
    """
    path = Path(path).resolve()
    if forbidden_root is not None:
        root = Path(forbidden_root).resolve()
        if path == root or root in path.parents:
            raise OrthodiffError(
                f"the key file {path} would lie inside {root}, next to the datasets; "
                "write it somewhere private instead (e.g. --key-file ~/secure/siteA_key.csv)"
            )
    fields = ["pseudonym", "case_id", "patient_pseudonym", "patient_id", "site", "cases", "series"]
    merged: dict[str, dict[str, list[str] | str]] = {}
    for row in rows:
        out = merged.setdefault(row["pseudonym"], {k: row.get(k, "") for k in fields[:5]} | {"cases": [], "series": []})
        for k in ("cases", "series"):
            value = row.get(k, "")
            for v in [value] if isinstance(value, str) else value:
                if v and v not in out[k]:
                    out[k].append(v)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for name in sorted(merged):
        row = merged[name]
        writer.writerow({k: "; ".join(row[k]) if isinstance(row[k], list) else row[k] for k in fields})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"), mode=0o600)  # never readable by others, not even briefly
