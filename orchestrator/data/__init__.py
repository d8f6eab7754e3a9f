"""Layer 0, foundations: the data path: manifests, shard and folder sources, splits,
minival and shares, passes, streams, the resident array."""
