"""Checkpoints from another site are loaded as data, never as code (torch.load weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orthodiff_nnunet.networks.encoder_io import FORMAT, EncoderMismatchError, read_encoder_checkpoint
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.networks.classifier import CHECKPOINT_FORMAT, read_classifier_checkpoint


class _Payload:
    """Unpickling this object runs code: it writes the file named in its argument."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a checkpoint ran"))


def _encoder_payload(**provenance) -> dict:
    return {"format": FORMAT, "state_dict": {"stages.0.weight": torch.ones(2, 1, 3, 3, 3)},
            "provenance": {"architecture_hash": "abc123", **provenance}}


def test_encoder_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    path = tmp_path / "encoder.pt"
    torch.save(_encoder_payload(note=_Payload(marker)), path)
    with pytest.raises(EncoderMismatchError, match=r"encoder\.pt is not a plain encoder checkpoint.*run code"):
        read_encoder_checkpoint(path)
    assert not marker.exists()


def test_plain_encoder_loads_and_one_without_architecture_hash_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_encoder_payload(orientation="sag", iterations=40, losses=[0.5, 0.25]), good)
    payload = read_encoder_checkpoint(good)
    assert payload["provenance"]["architecture_hash"] == "abc123"
    assert torch.equal(payload["state_dict"]["stages.0.weight"], torch.ones(2, 1, 3, 3, 3))

    bare = _encoder_payload()
    del bare["provenance"]["architecture_hash"]
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(EncoderMismatchError, match=r"bare\.pt records no architecture hash.*--resume"):
        read_encoder_checkpoint(tmp_path / "bare.pt")


def test_truncated_encoder_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(_encoder_payload(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EncoderMismatchError, match=r"cut\.pt cannot be read.*truncated"):
        read_encoder_checkpoint(path)


def test_classifier_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    evil, plain = tmp_path / "evil.pth", tmp_path / "plain.pth"
    base = {"format": CHECKPOINT_FORMAT, "network_weights": {"w": torch.zeros(3)}, "config": {"labels": ["EFFU"]},
            "history": [{"epoch": 0, "selection_mean_auroc": 0.75}], "current_epoch": 1}
    torch.save(base, plain)
    assert read_classifier_checkpoint(plain)["history"][0]["selection_mean_auroc"] == 0.75
    torch.save({**base, "config": {"labels": _Payload(marker)}}, evil)
    with pytest.raises(ClassificationError, match=r"evil\.pth is not a plain classifier checkpoint"):
        read_classifier_checkpoint(evil)
    assert not marker.exists()
    torch.save({"format": "something/else"}, tmp_path / "other.pth")
    with pytest.raises(ClassificationError, match="not an orthodiff classifier checkpoint"):
        read_classifier_checkpoint(tmp_path / "other.pth")


def test_encoder_exported_with_numpy_values_loads_safely(tmp_path: Path) -> None:
    """nnU-Net hands out numpy strings (dataset names from ids): export writes them as plain values."""
    import numpy as np
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from orthodiff_nnunet.networks.encoder_io import export_encoder

    net = PlainConvUNet(1, 2, [2, 4], torch.nn.Conv3d, 3, [1, 2], 1, 2, 1)
    path = export_encoder(net, tmp_path / "encoder.pt", {"architecture_hash": np.str_("h"), "dataset": np.str_("D1"),
                                                          "iterations": np.int64(3), "lr": np.float32(0.5),
                                                          "folder": tmp_path, "block": (np.int64(2), 4)})
    prov = read_encoder_checkpoint(path)["provenance"]
    assert (type(prov["dataset"]), type(prov["iterations"]), type(prov["lr"])) == (str, int, float)
    assert prov["folder"] == str(tmp_path) and prov["block"] == (2, 4) and type(prov["block"][0]) is int
