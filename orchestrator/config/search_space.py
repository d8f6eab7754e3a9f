"""The search space: dotted overrides of a member's config, each with a distribution.

    search:
      space:
        recipe.schedule.policy: {choice: [cosine, poly, onecycle]}
        recipe.optimizer.lr: {loguniform: [0.05, 0.8]}          # peak LR per 256 images
        recipe.schedule.params.power: {uniform: [1.0, 3.0]}     # used only when policy = poly
        recipe.augment.overrides.color_jitter: {uniform: [0.0, 0.4]}
        recipe.label_shuffling: {grid: [false, true]}

A policy's own hyperparameters are conditional: a sampled value that the sampled policy
does not take is dropped for that trial. Every path is checked against the member
config when the config loads (unknown field, empty choice, reversed or non-positive
range: one line naming the problem).
"""
from __future__ import annotations

from typing import Any

from orchestrator.config import Dimension, ResolvedMember, check_dimension, member_key, parse_recipe
from orchestrator.base.errors import UserError, did_you_mean
from orchestrator.train import lr

MEMBER_FIELDS = ("seed", "input_size", "low_res")  # besides recipe.*


def to_tune(dim: Dimension):
    from ray import tune

    v = dim.values
    return {"choice": lambda: tune.choice(v), "grid": lambda: tune.grid_search(v),
            "uniform": lambda: tune.uniform(*v), "loguniform": lambda: tune.loguniform(*v),
            "randint": lambda: tune.randint(v[0], v[1] + 1)}[dim.kind]()


def _policy_params(policy: str) -> set[str]:
    return set(lr.policy_params(policy))


def in_effect(overrides: dict[str, Any]) -> dict[str, Any]:
    """The sampled values a trial trains with: a policy parameter its sampled policy does
    not take is left out, as `apply` drops it."""
    policy, prefix = overrides.get("recipe.schedule.policy"), "recipe.schedule.params."
    if policy is None:
        return dict(overrides)
    takes = _policy_params(policy)
    return {k: v for k, v in overrides.items() if not k.startswith(prefix) or k[len(prefix):] in takes}


def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, dict):
            raise UserError(f"unknown search field {path!r}: {'.'.join(keys[:i])} is not a section")
        node = node.setdefault(k, {})
    if not isinstance(node, dict):
        raise UserError(f"unknown search field {path!r}: {'.'.join(keys[:-1])} is not a section")
    node[keys[-1]] = value


def apply(base: ResolvedMember, overrides: dict[str, Any]) -> ResolvedMember:
    """The member a trial trains: `base` with the sampled overrides; policy params the
    sampled policy does not take are dropped (conditional hyperparameters)."""
    member = {"recipe": base.recipe.model_dump(), "seed": base.seed, "input_size": base.input_size,
              "low_res": base.low_res}
    for path, value in overrides.items():
        root = path.split(".")[0]
        if root not in ("recipe", *MEMBER_FIELDS) or (root in MEMBER_FIELDS and path != root):
            raise UserError(f"unknown search field {path!r}; search paths start with recipe. or are one of "
                            f"{', '.join(MEMBER_FIELDS)}")
        _set(member, path, value)
    schedule = member["recipe"]["schedule"]
    takes = _policy_params(schedule["policy"])
    schedule["params"] = {k: v for k, v in schedule["params"].items() if k in takes}
    recipe = parse_recipe(member["recipe"], where="search trial recipe")
    payload = {"base": base.key, "overrides": {k: overrides[k] for k in sorted(overrides)}}
    return base.model_copy(update={"recipe": recipe, "seed": member["seed"], "input_size": member["input_size"],
                                   "low_res": member["low_res"], "key": member_key(base.name, payload)})


def check_space(space: dict[str, Dimension], base: ResolvedMember) -> None:
    """Every dimension on its own, then every value of it applied to the base member, so a
    misspelt path or a value the member config refuses fails before any trial starts."""
    for path, dim in space.items():
        check_dimension(path, dim)
        if path.startswith("recipe.schedule.params."):
            name = path.rsplit(".", 1)[1]
            policies = space.get("recipe.schedule.policy")
            candidates = policies.values if policies else [base.recipe.schedule.policy]
            if not any(name in _policy_params(p) for p in candidates):
                valid = sorted(set().union(*(_policy_params(p) for p in candidates)))
                raise UserError(f"unknown search field {path!r}: no searched LR policy takes {name!r}"
                                f"{did_you_mean(name, valid)}; "
                                f"valid params: {', '.join(valid) or 'none'}")
            continue
        for value in dim.values:
            apply(base, {path: value})


def param_space(space: dict[str, Dimension]) -> dict:
    return {path: to_tune(dim) for path, dim in space.items()}
