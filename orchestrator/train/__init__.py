"""The training core: plain PyTorch, no Ray and no MLflow; runs on CPU in pytest."""
