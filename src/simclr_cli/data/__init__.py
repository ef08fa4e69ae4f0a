"""Data: image sources, the synthetic set, SimCLR augmentation and deterministic loaders."""
