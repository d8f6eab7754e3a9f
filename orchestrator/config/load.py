"""From a YAML file to members: `load_config` expands `${VAR:-default}` from the
environment, validates the whole tree (`EnsembleConfig`) and raises a one-line
`UserError` on the first problem; `resolve_members` turns it into fully specified
members (defaults merged field by field, input geometry, resources and packing), each
with a stable key that hashes everything that affects its training.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from models import get_spec
from orchestrator.config.distill import Distill, DistillStep, DistillTeacher
from orchestrator.config.schema import (Data, Grid, Member, Mlflow, PackingOpts, RayOpts, Recipe, ResolvedMember,
                                        Resources, Storage, Strict)
from orchestrator.config.search import Search
from orchestrator.base.errors import UserError, key_hint, unknown_name
from orchestrator.planning.packing import resolve_auto
from orchestrator.records.runs_file import yaml_problem
from orchestrator.train.batch_augment import unsupported


class EnsembleConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: Data
    storage: Storage = Storage()
    mlflow: Mlflow = Mlflow()
    ray: RayOpts = RayOpts()
    recipes: dict[str, Recipe] = {"default": Recipe()}
    defaults: Member = Member()
    members: list[Member] = []
    grid: Grid | None = None
    search: Search | None = None  # used by jobs/search.py
    packing: PackingOpts = PackingOpts()
    imported_runs: list[str] = Field([], description="runs files whose finished members join as they are")
    distill: DistillStep | None = None  # after the members: a student of the ensemble and its plain twin

    @model_validator(mode="after")
    def _members_present(self):
        if not self.members and self.grid is None and not self.imported_runs:
            raise UserError("config has no members: give `members:`, `grid:` or `imported_runs:`")
        return self


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment, as in a shell."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1)) or m.group(2)
        if value is None:
            raise UserError(f"config uses ${{{m.group(1)}}} but it is not set and has no default")
        return value

    return _ENV.sub(sub, text)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config key {where!r}{key_hint(EnsembleConfig, err['loc'])}"
    return f"config {where}: {err['msg']}"


def parse_config(raw: dict) -> EnsembleConfig:
    try:
        return EnsembleConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_error(exc)) from None


def parse_recipe(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(["recipe", *(str(p) for p in err["loc"])])
        what = f"unknown field{key_hint(Recipe, err['loc'], 'fields')}" if err["type"] == "extra_forbidden" \
            else err["msg"]
        raise UserError(f"{where}: {path}: {what}") from None


def load_config(path: str) -> EnsembleConfig:
    try:
        with open(path) as f:
            raw = yaml.safe_load(expand_env(f.read()))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    return parse_config(raw)


def member_key(name: str, payload: dict) -> str:
    """Stable key: the member's name plus a hash of everything that affects its training,
    so an edited recipe trains a new member instead of resuming an incompatible one."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def recipe_payload(recipe: Recipe) -> dict:
    """The recipe as hashed into member keys. Fields added after keys were first issued
    count only when set, so existing members keep their keys (and resume)."""
    out = recipe.model_dump()
    for late in ("max_steps_per_epoch", "distill"):
        if out[late] is None:
            del out[late]
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge(defaults: Member, m: Member) -> Member:
    """Member over defaults over built-ins, field by field in nested sections too: a
    member's `resources: {workers: 2}` keeps the defaults' `use_gpu`."""
    return Member.model_validate(_deep_merge(defaults.model_dump(exclude_unset=True), m.model_dump(exclude_unset=True)))


LOW_RES_MAX = 64  # px: at or below, a unset low_res means the 32-64 px stem


def input_geometry(m: Member, spec) -> tuple[int, bool]:
    """(input size, low_res) with no silent default: see Member.low_res."""
    if m.low_res is None:
        size = m.input_size or spec.eval.input_size
        return size, size <= LOW_RES_MAX
    return m.input_size or (spec.low_res_size if m.low_res else spec.eval.input_size), m.low_res


def _grid_members(grid: Grid) -> list[Member]:
    return [Member(arch=a, recipe=r, seed=s) for a, r, s in itertools.product(grid.archs, grid.recipes, grid.seeds)]


def _pack(name: str, resources: Resources, opts: PackingOpts) -> tuple[Resources, str | None]:
    share, decision = resolve_auto(name, resources, opts)
    return resources.model_copy(update={"gpus_per_worker": share}), decision.reason if decision else None


def _check_decode(name: str, recipe: Recipe, resources: Resources) -> None:
    missing = unsupported(recipe.augment.fields(), recipe.cam_crops is not None)
    if resources.decode == "gpu" and missing:
        raise UserError(f"member {name}: decode: gpu cannot apply {', '.join(missing)} (per-image CPU "
                        f"operations); use decode: cpu or auto, or drop them")


def resolve_members(cfg: EnsembleConfig) -> list[ResolvedMember]:
    """Explicit members first, then the grid product; defaults fill unset fields."""
    out: list[ResolvedMember] = []
    for m in cfg.members + (_grid_members(cfg.grid) if cfg.grid else []):
        m = _merge(cfg.defaults, m)
        if m.arch is None:
            raise UserError(f"member {m.name or len(out)} has no `arch`")
        spec = get_spec(m.arch)
        recipe_name = m.recipe or "default"
        if recipe_name not in cfg.recipes:
            raise unknown_name("recipe", recipe_name, cfg.recipes)
        recipe = cfg.recipes[recipe_name]
        size, low_res = input_geometry(m, spec)
        if low_res and size < spec.min_low_res_size:
            raise UserError(f"{m.arch} needs input_size >= {spec.min_low_res_size} in its low-res form, got {size}")
        name = m.name or f"{m.arch}-{recipe_name}-s{m.seed}"
        resources = m.resources or Resources()
        resources.check(name)
        _check_decode(name, recipe, resources)
        resources, packing = _pack(name, resources, cfg.packing)
        payload = {"arch": m.arch, "recipe": recipe_payload(recipe), "seed": m.seed, "low_res": low_res,
                   "input_size": size, "workers": resources.workers, "data": cfg.data.key_fields()}
        share = len(out) % cfg.data.shares if cfg.data.shares else None
        if share is not None:
            payload["share"] = share
        out.append(ResolvedMember(key=member_key(name, payload), name=name, arch=m.arch, recipe_name=recipe_name,
                                  recipe=recipe, seed=m.seed, low_res=low_res, input_size=size,
                                  weight=m.weight, resources=resources, packing=packing, share=share))
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"member names must be unique; repeated: {', '.join(dupes)}")
    return out


def resolve_students(cfg: EnsembleConfig, teacher_runs: str, teacher_members: list[str]) -> list[ResolvedMember]:
    """The distill step's students, one per seed (each its recipe with `distill` set: the
    ensemble of `teacher_members` in `teacher_runs`), then their plain twins (the same recipe
    without it: same architecture, images, epochs and seed), each with its role; students
    first, the longer trials, so that side by side they finish together. All train on all
    of train but the minival, the images the members shared among them (no `data.shares`);
    the teacher's member names enter the student's key, so a changed ensemble is a new student."""
    step, s = cfg.distill, cfg.distill.student
    if s.recipe not in cfg.recipes:
        raise unknown_name("distill.student.recipe", s.recipe, cfg.recipes)
    if len(set(s.seeds())) != len(s.seeds()) or not s.seeds():
        raise UserError(f"distill.student.seed {s.seed}: give one seed or a list of different seeds")
    names = {seed: s.name_for(seed) for seed in s.seeds()}
    taken = {m.name for m in resolve_members(cfg)} & {n + end for n in names.values() for end in ("", "-twin")}
    if taken:
        raise UserError(f"distill.student.name: {', '.join(sorted(taken))} already a member's name")
    distill = Distill(teacher=DistillTeacher(runs=teacher_runs, members=sorted(teacher_members)),
                      temperature=step.temperature, alpha=step.alpha)
    base = cfg.recipes[s.recipe]
    recipes = {f"{s.recipe}+distill": base.model_copy(update={"distill": distill}), s.recipe: base}
    common = {"arch": s.arch, "input_size": s.input_size}
    members = [Member(name=name, recipe=f"{s.recipe}+distill", seed=seed, **common) for seed, name in names.items()]
    roles = [f"student of {cfg.name}"] * len(members)
    if step.twin:
        members += [Member(name=f"{name}-twin", recipe=s.recipe, seed=seed, **common) for seed, name in names.items()]
        roles += [f"twin of {name}" for name in names.values()]
    own = cfg.model_copy(update={"members": members, "grid": None, "recipes": recipes,
                                 "data": cfg.data.model_copy(update={"shares": None})})
    return [m.model_copy(update={"role": role}) for m, role in zip(resolve_members(own), roles)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
