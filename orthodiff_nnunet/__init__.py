"""OrthoDiff-nnU-Net: OrthoDiffusion on top of nnU-Net v2 for musculoskeletal MRI."""

__version__ = "0.1.0"
