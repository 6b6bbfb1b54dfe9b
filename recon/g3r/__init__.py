"""G3R learned optimizer: gradient lifting, sparse-voxel network, unrolled updates, meta-training."""
