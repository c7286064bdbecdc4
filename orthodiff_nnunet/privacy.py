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
import os
import secrets
from pathlib import Path

from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.utils import atomic_write_text

_HEX_CHARS = 10  # 40 bits: collisions are checked, and are negligible for site-sized datasets


def load_or_create_key(path: Path, create: bool = True) -> bytes:
    """Read the secret key, or create it (mode 0600) when it does not exist and ``create``."""
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        if len(text) < 32:
            raise OrthodiffError(f"pseudonym key {path} is too short or damaged; restore it from a backup")
        return bytes.fromhex(text)
    if not create:
        return secrets.token_bytes(32)  # dry run: an ephemeral key, nothing written
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    atomic_write_text(path, key.hex() + "\n")
    os.chmod(path, 0o600)
    return key


def pseudonym(key: bytes, kind: str, source_id: str, prefix: str = "") -> str:
    """Stable, non-reversible pseudonym ``<prefix><10 hex>`` of ``source_id`` for ``kind``."""
    digest = hmac.new(key, f"{kind}\x1f{source_id}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:_HEX_CHARS]}"


def write_key_file(path: Path, rows: list[dict[str, str]], forbidden_root: Path | None = None) -> None:
    """Write the pseudonym -> source id table (CSV), refusing any place inside ``forbidden_root``.

    Args:
        path: the CSV to write.
        rows: dicts with keys ``pseudonym``, ``case_id``, ``patient_pseudonym``, ``patient_id``, ``site``.
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
    fields = ["pseudonym", "case_id", "patient_pseudonym", "patient_id", "site"]
    lines: list[str] = []

    class _Buf:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.DictWriter(_Buf(), fieldnames=fields)
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["pseudonym"]):
        writer.writerow({k: row.get(k, "") for k in fields})
    atomic_write_text(path, "".join(lines))
    os.chmod(path, 0o600)
