"""MkDocs hook: the configs reference page, generated from the pydantic schema at every
build (`reference.md`), so it lists every field, its type, default and description and
cannot drift from the code. `render()` is also what tests/test_docs.py checks."""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orchestrator.config import EnsembleConfig  # noqa: E402

PAGE = "reference.md"
INTRO = """# Config reference

Every field of an ensemble config (`configs/*.yaml`), generated from its schema
(`orchestrator/config/schema.py`, `search.py`, `load.py`) when the site is built. Unknown
keys are refused; `${VAR:-default}` is expanded from the environment. The guide is
[Configs](configs.md).
"""


def models_of(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (inside Optional, list, dict, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out += models_of(arg)
    return out


def reachable(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen, order = set(), []

    def visit(model):
        if model in seen:
            return
        seen.add(model)
        order.append(model)
        for field in model.model_fields.values():
            for sub in models_of(field.annotation):
                visit(sub)

    visit(root)
    return order


def type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return str(annotation).replace("typing.", "")


def default_of(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(f"`{k}`: a {type(v).__name__} with its defaults" for k, v in value.items())
    return f"`{value!r}`"


def render(root: type[BaseModel] = EnsembleConfig) -> str:
    out = [INTRO]
    for model in reachable(root):
        doc = (model.__doc__ or "").strip().splitlines()
        out.append(f"\n## {model.__name__}\n")
        if doc and not doc[0].startswith("!!!") and model.__doc__ is not BaseModel.__doc__:
            out.append(f"{doc[0]}\n")
        out.append("\n| field | type | default | description |\n|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            text = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{name}` | {type_name(field.annotation)} | {default_of(field)} | {text} |\n")
    return "".join(out)


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
