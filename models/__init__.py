"""Model zoo: a registry of architectures, each carrying its input size and eval transform."""
from models.registry import (
    ModelSpec,
    build_model,
    get_spec,
    list_models,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["ModelSpec", "build_model", "get_spec", "list_models", "load_checkpoint", "save_checkpoint"]
