"""Layer 2, what users see: MLflow records (tracking.py), PNG plots, the terminal board
(progress.py) and console."""
