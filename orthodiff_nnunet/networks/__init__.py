"""Networks built from nnU-Net plans, timestep conditioning, and the encoder weight contract."""
