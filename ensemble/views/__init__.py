"""Layer 2, what users see: an evaluation's report as terminal tables, CSV, JSON and PNG
plots, and its MLflow records."""
