"""Layer 1, the Ray-free core. One typed config tree for an ensemble job, loaded from YAML; unknown keys rejected.

    name, data, storage, mlflow, ray          -- where things live
    recipes: {name: Recipe}                   -- optimiser, LR policy, augmentation, epochs
    defaults: Member fields shared by all members
    members: [Member]  and/or  grid: {archs x recipes x seeds}

`load_config` expands `${VAR:-default}` from the environment, validates, and raises a
one-line `UserError` on the first problem. `resolve_members` turns the config into the
list of fully specified members, each with a stable key.

The package: `schema.py` (the sections), `search.py` (the search section),
`load.py` (loading, environment expansion, member resolution and keys), `contracts.py`
(what crosses a process boundary: a job's context, a member's work). Its names are
importable from here.
"""
from orchestrator.config.contracts import JobContext, MemberWork
from orchestrator.config.load import (EnsembleConfig, expand_env, flatten, input_geometry, load_config, member_key,
                                      parse_config, parse_recipe, recipe_payload, resolve_members,
                                      resolve_students)
from orchestrator.config.distill import THIS_JOB, Distill, DistillStep, DistillTeacher, Student
from orchestrator.config.schema import (H200_PACKING_GAINS, Augment, CamCrops, ConfusionPrior, Data, Grid, Member,
                                        Mlflow, Optimizer, PackingOpts, RayOpts, Recipe, ResolvedMember, Resources,
                                        Schedule, Storage, Strict, Teacher)
from orchestrator.config.search import Asha, Dimension, Pbt, Search, Select, check_dimension

__all__ = ["Asha", "Augment", "CamCrops", "ConfusionPrior", "Data", "Dimension", "EnsembleConfig", "Grid",
           "H200_PACKING_GAINS", "JobContext", "Member", "MemberWork", "Mlflow", "Optimizer", "PackingOpts", "Pbt", "RayOpts", "Recipe",
           "ResolvedMember", "Resources", "Schedule", "Search", "Select", "Storage", "Strict", "Teacher",
           "check_dimension", "expand_env", "flatten", "input_geometry", "load_config", "member_key", "parse_config",
           "parse_recipe", "recipe_payload", "resolve_members", "resolve_students", "THIS_JOB", "Distill", "DistillStep",
           "DistillTeacher", "Student"]
