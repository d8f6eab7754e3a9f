"""Layer 1, the Ray-free core: where members would run and for how long (plan.py,
cluster.py), and GPU sharing (packing.py)."""
