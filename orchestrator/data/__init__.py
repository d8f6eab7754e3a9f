"""The data path: manifests, shard and folder sources, subsets, per-worker parts."""
