"""Layer 1, the Ray-free core: the training core, plain PyTorch, no Ray and no MLflow;
runs on CPU in pytest."""
