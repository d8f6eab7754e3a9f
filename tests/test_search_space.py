"""The search space and the choice of members, without Ray: bad spaces are refused with one
line; a trial's member is the base plus its overrides; ensemble-aware choice beats top-k
when the top trials are near-copies."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from ensemble.core.math import greedy_selection
from ensemble.core.protocol import split_rows
from orchestrator.config import parse_config, resolve_members
from orchestrator.base.errors import UserError
from orchestrator.config import search_space as space
from orchestrator.drivers.search_choice import compare
from orchestrator.drivers.search_job import load_and_check
from tests.conftest import ROOT, run_cli

SMOKE = ROOT / "configs" / "search" / "smoke.yaml"


def smoke_raw(tiny_root) -> dict:
    raw = yaml.safe_load(SMOKE.read_text().replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200", tiny_root))
    return raw


def check(raw: dict, tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_and_check(str(path))


@pytest.mark.parametrize("field, dim, message", [
    ("recipe.augment.overrides.colour_jitter", {"uniform": [0, 0.4]}, "unknown augmentation field 'colour_jitter'"),
    ("recipe.optimiser.lr", {"uniform": [0.1, 0.2]}, "recipe.optimiser: unknown field (did you mean 'optimizer'?)"),
    ("recipe.optimizer.lrr", {"uniform": [0.1, 0.2]}, "recipe.optimizer.lrr: unknown field (did you mean 'lr'?)"),
    ("recipe.augment.overrides.colour_jitter", {"uniform": [0, 0.4]}, "(did you mean 'color_jitter'?)"),
    ("recipe.schedule.params.finl", {"uniform": [0, 0.1]}, "takes 'finl' (did you mean 'final'?)"),
    ("recipe.optimizer.lr", {"choice": []}, "choice is empty"),
    ("recipe.optimizer.lr", {"uniform": [0.5, 0.1]}, "range [0.5, 0.1] is empty or reversed"),
    ("recipe.optimizer.lr", {"loguniform": [0.0, 0.1]}, "positive low bound"),
    ("recipe.optimizer.lr", {"uniform": [0.1, 0.2], "choice": [0.1]}, "exactly one of"),
    ("recipe.optimizer.lr", {"uniform": [-0.1, 0.2]}, "greater than 0"),
    ("recipe.schedule.params.period", {"uniform": [1, 2]}, "no searched LR policy takes 'period'"),
    ("recipe.epochs.max", {"choice": [1]}, "is not a section"),
    ("arch", {"choice": ["resnet18"]}, "unknown search field 'arch'"),
    ("recipe.schedule.policy", {"choice": ["cosine", "linear"]}, "unknown LR policy 'linear'"),
])
def test_bad_search_spaces_are_refused_with_one_line(tiny_root, tmp_path, field, dim, message):
    raw = smoke_raw(tiny_root)
    raw["search"]["space"] = {field: dim}
    with pytest.raises(UserError) as err:
        check(raw, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_cli_exits_2_on_a_bad_space_and_accepts_the_smoke_search(tiny_root, tmp_path):
    raw = smoke_raw(tiny_root)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(raw))
    assert run_cli("jobs/search.py", "--config", str(ok), "--dry-run").returncode == 0
    raw["search"]["space"]["recipe.optimizer.lr"] = {"choice": []}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = run_cli("jobs/search.py", "--config", str(bad), "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "choice is empty" in out.stderr


def test_pbt_needs_something_to_perturb(tiny_root, tmp_path):
    raw = smoke_raw(tiny_root)
    raw["search"].update(scheduler="pbt", space={"recipe.schedule.policy": {"choice": ["cosine", "poly"]}})
    with pytest.raises(UserError, match="pbt needs something to perturb"):
        check(raw, tmp_path)
    raw["search"]["pbt"] = {"mutate": ["recipe.optimizer.lr"]}
    with pytest.raises(UserError, match="is not searched"):
        check(raw, tmp_path)


def test_search_trials_are_single_worker(tiny_root, tmp_path):
    raw = smoke_raw(tiny_root)
    raw["defaults"]["resources"]["workers"] = 2
    with pytest.raises(UserError, match="one worker each"):
        check(raw, tmp_path)


def test_a_trial_member_is_the_base_with_its_overrides(tiny_root, tmp_path):
    cfg, bases = check(smoke_raw(tiny_root), tmp_path)
    base = bases[0]
    m = space.apply(base, {"recipe.schedule.policy": "poly", "recipe.schedule.params.power": 2.5,
                           "recipe.optimizer.lr": 0.05, "recipe.augment.overrides.color_jitter": 0.3})
    assert m.recipe.schedule.policy == "poly" and m.recipe.schedule.params == {"power": 2.5}
    assert m.recipe.optimizer.lr == 0.05 and m.recipe.augment.fields().color_jitter == 0.3
    assert m.key != base.key and base.recipe.optimizer.lr == 0.2  # the base is untouched
    cosine = space.apply(base, {"recipe.schedule.policy": "cosine", "recipe.schedule.params.power": 2.5})
    assert cosine.recipe.schedule.params == {}  # power is poly's: dropped for a cosine trial
    assert space.apply(base, {"recipe.optimizer.lr": 0.05}).key == space.apply(base, {"recipe.optimizer.lr": 0.05}).key


def test_hikvision_options_are_searchable(tiny_root, tmp_path):
    raw = smoke_raw(tiny_root)
    raw["search"]["space"] = {"recipe.label_shuffling": {"grid": [False, True]},
                              "recipe.plain_last_epochs": {"randint": [0, 2]},
                              "recipe.augment.overrides.random_interpolation": {"choice": [False, True]},
                              "recipe.augment.overrides.crop_scale": {"choice": [[0.08, 1.0], [0.35, 1.0]]}}
    cfg, bases = check(raw, tmp_path)
    m = space.apply(bases[0], {"recipe.label_shuffling": True, "recipe.plain_last_epochs": 2,
                               "recipe.augment.overrides.crop_scale": [0.35, 1.0]})
    assert m.recipe.label_shuffling and m.recipe.plain_last_epochs == 2
    assert m.recipe.augment.fields().crop_scale == (0.35, 1.0)


def library(n: int = 600, seed: int = 0):
    """Three near-copies that are the best alone, and two weaker but different trials."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    def member(right: np.ndarray, noise: float) -> np.ndarray:
        p = rng.dirichlet(np.ones(10), n) * 0.5
        p[np.arange(n), labels] += np.where(right, 0.6, 0.0)
        p[np.arange(n), (labels + 1) % 10] += np.where(right, 0.0, 0.6)
        p += noise * rng.random((n, 10))
        return (p / p.sum(1, keepdims=True)).astype(np.float32)
    common = rng.random(n) < 0.70
    copies = [member(common, 0.01) for _ in range(3)]
    other = [member(rng.random(n) < 0.62, 0.01) for _ in range(2)]
    return copies + other, labels


def test_greedy_choice_adds_different_trials_where_top_k_takes_copies():
    preds, labels = library()
    out = compare(preds, labels, size=3, metric="nll", fraction=0.5)
    assert sorted(out["topk"]["chosen"]) == [0, 1, 2]  # the near-copies: best on their own
    assert {3, 4} & set(out["greedy"]["chosen"])  # marginal gain prefers a different member
    assert out["greedy"]["top1_err"] < out["topk"]["top1_err"]
    assert out["selection_rows"] + out["report_rows"] == len(labels)


def test_the_choice_streams_trials_predictions_one_at_a_time():
    """The driver reads a trial's predictions when it uses them: at most the running
    combination and one trial's array alive, the same choice as with all in memory."""
    import gc
    import weakref

    from orchestrator.drivers.search_choice import LazyArrays

    preds, labels = library()
    alive, peak = set(), [0]

    def read(i):
        array = preds[i].copy()
        alive.add(id(array))
        weakref.finalize(array, alive.discard, id(array))
        gc.collect(0)  # the young generation: where a cycle just made by the reader would sit
        peak[0] = max(peak[0], len(alive))
        return array

    lazy = compare(LazyArrays(range(len(preds)), read), labels, size=3, metric="nll", fraction=0.5)
    assert lazy == compare(preds, labels, size=3, metric="nll", fraction=0.5)
    assert peak[0] <= 2  # the one being read, and at most one not yet collected


def test_the_search_chooses_members_by_the_evaluations_caruana_selection():
    preds, labels = library()
    choice = compare(preds, labels, size=4, metric="nll", fraction=0.5)["greedy"]
    sel, _ = split_rows(len(labels), 0.5, 0)
    picks, curve = greedy_selection(lambda i: preds[i][sel], len(preds), labels[sel], rounds=3, init=1, metric="nll")
    assert choice["picks"] == picks and choice["selection_curve"] == curve  # the one algorithm, not a copy
    assert choice["chosen"] == list(dict.fromkeys(picks)) and sum(choice["weights"]) == len(picks) <= 4
    assert choice["weights"] == [float(picks.count(i)) for i in choice["chosen"]]


def test_imported_runs_must_match_the_ensembles_data(tiny_root, tmp_path):
    from orchestrator.records.from_job import imported
    from orchestrator.records.runs_file import DatasetRef, EvalRef, MemberRecord, RunsFile, write_runs

    runs = RunsFile(ensemble="s", dataset=DatasetRef(name="tiny", uri=tiny_root, num_classes=10, labels="l.npy",
                                                     classes=10, per_class=8),
                    members=[MemberRecord(name="t1", key="k", arch="vgg11_bn", checkpoint="c", predictions="p",
                                          eval=EvalRef(input_size=32, resize=32, crop=32, mean=[0] * 3, std=[1] * 3))])
    write_runs(str(tmp_path / "runs.yaml"), runs)
    raw = {"name": "e", "data": {"root": tiny_root, "classes": 10, "val_per_class": 8},
           "imported_runs": [str(tmp_path / "runs.yaml")]}
    cfg = parse_config(copy.deepcopy(raw))
    assert [m.name for m in imported(cfg, resolve_members(cfg))] == ["t1"]
    raw["data"]["val_per_class"] = 4
    cfg = parse_config(raw)
    with pytest.raises(UserError, match="scored on"):
        imported(cfg, [])


def test_optuna_is_pluggable_and_its_absence_is_one_line(tiny_root, tmp_path):
    import importlib.util

    from orchestrator.drivers.search_job import build_search_alg

    raw = smoke_raw(tiny_root)
    raw["search"]["algorithm"] = "optuna"
    cfg, _ = check(raw, tmp_path)
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(UserError, match="needs the optuna package .* valid choices without it: random"):
            build_search_alg(cfg.search)
    else:
        assert type(build_search_alg(cfg.search)).__name__ == "OptunaSearch"
    raw["search"]["scheduler"] = "pbt"
    with pytest.raises(UserError, match="pbt samples its own population"):
        check(raw, tmp_path)


def test_the_searchs_choice_keeps_to_a_budget_in_multiply_adds():
    preds, labels = library()
    cost = [1e6, 1e6, 1e6, 5e6, 5e6]  # the two different trials cost five times a copy
    free = compare(preds, labels, size=3, metric="nll", fraction=0.5)["greedy"]
    bound = compare(preds, labels, size=3, metric="nll", fraction=0.5, cost=cost, budget=6.5e6)["greedy"]
    assert sorted(free["chosen"]) == [1, 3, 4] and sum(cost[i] for i in free["chosen"]) == 11e6  # over it
    assert sorted(bound["chosen"]) == [1, 3] and bound["cost"] == sum(cost[i] for i in bound["chosen"]) <= 6.5e6 and bound["budget"] == 6.5e6
