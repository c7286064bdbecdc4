"""Installed as orthodiff_nnunet.planners."""
