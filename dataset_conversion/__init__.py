"""Installed as orthodiff_nnunet.dataset_conversion."""
