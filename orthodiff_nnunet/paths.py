"""The only place that reads environment variables.

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` at call time, so
commands may set them (``set_nnunet_paths``) before calling into nnunetv2.
"""

from __future__ import annotations

import os
from pathlib import Path

from orthodiff_nnunet.errors import OrthodiffError

ENV_RAW = "nnUNet_raw"
ENV_PREPROCESSED = "nnUNet_preprocessed"
ENV_RESULTS = "nnUNet_results"


class PathsNotSetError(OrthodiffError):
    """An nnU-Net folder was needed but neither given nor set in the environment."""


def _resolve(value: str | os.PathLike | None, env: str, flag: str) -> Path:
    if value is not None:
        return Path(value).expanduser().resolve()
    env_value = os.environ.get(env)
    if not env_value:
        raise PathsNotSetError(
            f"no {env} folder: pass {flag} or set the environment variable {env} "
            f"(e.g. export {env}=/data/nnUNet_raw)"
        )
    return Path(env_value).expanduser().resolve()


def raw_dir(value: str | os.PathLike | None = None) -> Path:
    """``nnUNet_raw``: the given folder, else the environment variable."""
    return _resolve(value, ENV_RAW, "--raw")


def preprocessed_dir(value: str | os.PathLike | None = None) -> Path:
    """``nnUNet_preprocessed``: the given folder, else the environment variable."""
    return _resolve(value, ENV_PREPROCESSED, "--preprocessed")


def results_dir(value: str | os.PathLike | None = None) -> Path:
    """``nnUNet_results``: the given folder, else the environment variable."""
    return _resolve(value, ENV_RESULTS, "--results")


def set_nnunet_paths(raw: Path | None = None, preprocessed: Path | None = None, results: Path | None = None) -> None:
    """Export the given folders for nnunetv2, which reads them at call time."""
    for env, value in ((ENV_RAW, raw), (ENV_PREPROCESSED, preprocessed), (ENV_RESULTS, results)):
        if value is not None:
            Path(value).mkdir(parents=True, exist_ok=True)
            os.environ[env] = str(Path(value).resolve())


def pseudonym_key_default(raw: Path) -> Path:
    """Default location of the secret pseudonymisation key: beside, never inside, the datasets."""
    override = os.environ.get("ORTHODIFF_PSEUDONYM_KEY")
    if override:
        return Path(override).expanduser().resolve()
    return raw / ".orthodiff" / "pseudonym.key"
