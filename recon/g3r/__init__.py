"""G3R learned optimizer: gradient lifting, sparse-voxel network, updates, training."""
