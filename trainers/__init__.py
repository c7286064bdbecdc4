"""Installed as orthodiff_nnunet.trainers."""
