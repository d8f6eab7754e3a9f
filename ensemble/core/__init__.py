"""Layer 1, the Ray-free core: the ensemble math, the evaluation protocol and library, the
servable ensemble; no terminal, plots or MLflow logging (those are `ensemble.views`)."""
