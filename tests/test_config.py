"""The typed config: unknown keys rejected, members expanded, bad input = one line + exit 2."""
import pytest
import yaml

from orchestrator.config import load_config, parse_config, resolve_members, resolve_students
from orchestrator.base.errors import UserError
from tests.conftest import run_cli


def base(**extra):
    cfg = {"name": "t", "data": {"root": "/data"}, "recipes": {"a": {}, "b": {"epochs": 3}},
           "members": [{"arch": "resnet18", "recipe": "a"}]}
    cfg.update(extra)
    return cfg


def test_unknown_keys_are_rejected_at_every_level():
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        parse_config(base(learning_rate=0.1))
    with pytest.raises(UserError, match="unknown config key 'recipes.a.optimiser'"):
        parse_config(base(recipes={"a": {"optimiser": {}}}))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["recipes"]["a"].update(epoch=3), "unknown config key 'recipes.a.epoch' (did you mean 'epochs'?); "
                                                  "valid keys there: epochs, batch_size,"),
    (lambda c: c["recipes"]["a"].update(optimizer={"lrr": 0.1}), "'recipes.a.optimizer.lrr' (did you mean 'lr'?)"),
    (lambda c: c["data"].update(clases=3), "'data.clases' (did you mean 'classes'?); valid keys there: root,"),
    (lambda c: c["members"][0].update(sed=1), "'members.0.sed' (did you mean 'seed'?)"),
    (lambda c: c.update(memebers=[]), "unknown config key 'memebers' (did you mean 'members'?)"),
    (lambda c: c["recipes"]["a"].update(schedule={"policy": "cosin"}), "unknown LR policy 'cosin' (did you mean "
                                                                        "'cosine'?); valid choices:"),
    (lambda c: c["recipes"]["a"].update(schedule={"policy": "cosine", "params": {"finl": 0.1}}),
     "LR policy 'cosine' has no parameter 'finl' (did you mean 'final'?); valid params: final"),
])
def test_an_unknown_key_or_name_suggests_the_closest_valid_one(edit, message):
    cfg = base()
    edit(cfg)
    with pytest.raises(UserError) as caught:
        parse_config(cfg)
    assert message in str(caught.value)


def test_no_suggestion_when_nothing_is_close():
    from orchestrator.base.errors import did_you_mean

    assert did_you_mean("zzzqqq", ["members", "data"]) == ""
    assert did_you_mean("c", ["a", "b"]) == ""  # one letter off a one-letter name is no hint
    assert did_you_mean("Epochs", ["epochs", "batch_size"]) == " (did you mean 'epochs'?)"


def test_wrong_type_names_the_field():
    with pytest.raises(UserError, match="recipes.a.epochs"):
        parse_config(base(recipes={"a": {"epochs": "many"}}))


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(UserError, match="unknown LR policy 'linear'; valid choices: .*cosine"):
        parse_config(base(recipes={"a": {"schedule": {"policy": "linear"}}}))
    with pytest.raises(UserError, match="LR policy 'cosine' has no parameter 'power'; valid params: final"):
        parse_config(base(recipes={"a": {"schedule": {"policy": "cosine", "params": {"power": 2}}}}))
    with pytest.raises(UserError, match="unknown architecture 'resnet19'.*resnet18"):
        resolve_members(parse_config(base(members=[{"arch": "resnet19"}])))
    with pytest.raises(UserError, match="unknown recipe 'c'; valid choices: a, b"):
        resolve_members(parse_config(base(members=[{"arch": "resnet18", "recipe": "c"}])))


def test_grid_is_the_product_and_keys_are_stable():
    cfg = parse_config(base(members=[], grid={"archs": ["resnet18", "vgg11_bn"], "recipes": ["a", "b"],
                                              "seeds": [0, 1, 2]}))
    members = resolve_members(cfg)
    assert len(members) == 12 and len({m.key for m in members}) == 12
    assert [m.key for m in members] == [m.key for m in resolve_members(cfg)]
    again = parse_config(base(members=[], grid={"archs": ["resnet18", "vgg11_bn"], "recipes": ["a", "b"],
                                                "seeds": [0, 1, 2]}))
    assert [m.key for m in resolve_members(again)] == [m.key for m in members]
    changed = parse_config(base(members=[], recipes={"a": {"epochs": 9}, "b": {"epochs": 3}},
                                grid={"archs": ["resnet18"], "recipes": ["a"], "seeds": [0]}))
    assert resolve_members(changed)[0].name == "resnet18-a-s0"
    assert resolve_members(changed)[0].key != members[0].key  # an edited recipe is a new member


def test_defaults_fill_members_and_duplicates_are_refused():
    cfg = parse_config(base(defaults={"input_size": 48, "recipe": "b"}, members=[{"arch": "resnet18"},
                                                                                  {"arch": "vgg11_bn", "input_size": 32}]))
    a, b = resolve_members(cfg)
    assert (a.input_size, a.recipe_name, b.input_size) == (48, "b", 32)
    with pytest.raises(UserError, match="repeated: x"):
        resolve_members(parse_config(base(defaults={"recipe": "a"}, members=[{"arch": "resnet18", "name": "x"},
                                                                             {"arch": "vgg11_bn", "name": "x"}])))


def test_env_expansion(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(data={"root": "${MY_DATA:-/default}/tiny"})))
    assert load_config(str(path)).data.root == "/default/tiny"
    monkeypatch.setenv("MY_DATA", "s3://bucket/data")
    assert load_config(str(path)).data.root == "s3://bucket/data/tiny"


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/**/*.yaml")):
        cfg = load_config(str(path))
        members = resolve_members(cfg)
        if cfg.distill is not None:  # a student and its twin of an imported ensemble
            members += resolve_students(cfg, cfg.distill.teacher, ["-"])
        assert members, path
        if "search" in path.parts:
            from orchestrator.config.search_space import check_space

            for m in members:
                check_space(load_config(str(path)).search.space, m)
    big = resolve_members(load_config(str(Path(__file__).parents[1] / "configs/tiny-imagenet-20.yaml")))
    from models import get_spec

    assert len(big) >= 20 and len({get_spec(m.arch).family for m in big}) >= 6


@pytest.mark.parametrize("edit, message", [
    ({"learning_rate": 1}, "unknown config key 'learning_rate'"),
    ({"members": [{"arch": "alexnet9"}]}, "unknown architecture 'alexnet9'; valid choices:"),
    ({"recipes": {"a": {"augment": {"preset": "wild"}}}}, "unknown augmentation preset 'wild'; valid choices:"),
    ({"data": {"root": "/nonexistent/data"}}, "data folder not found: /nonexistent/data"),
    ({"data": {"root": "TINY", "num_classes": 1000}}, "data.num_classes is 1000 but"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_root, edit, message):
    cfg = base(**edit)
    if cfg["data"]["root"] == "TINY":
        cfg["data"]["root"] = tiny_root
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("jobs/train_ensemble.py", "--config", str(path), "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr and "Traceback" not in out.stderr


def test_an_unwritable_storage_path_fails_before_training(tmp_path, tiny_root):
    cfg = base()
    cfg["data"]["root"] = tiny_root
    cfg["storage"] = {"path": "/proc/ensembles-storage"}  # unwritable even for root
    path = tmp_path / "ro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("jobs/train_ensemble.py", "--config", str(path), "--runs", str(tmp_path / "runs.yaml"))
    assert out.returncode == 2 and "storage path /proc/ensembles-storage is not writable" in out.stderr
    assert out.stderr.strip().count("\n") == 0 and not (tmp_path / "runs.yaml").exists()


def test_cli_missing_config_file():
    out = run_cli("jobs/train_ensemble.py", "--config", "nope.yaml")
    assert out.returncode == 2 and out.stderr.strip() == "error: config file not found: nope.yaml"


def test_readme_example_merges_resources_field_by_field():
    # the configs page's example: a member's resources override the defaults' one field at a time
    cfg = parse_config(base(defaults={"input_size": 64, "resources": {"workers": 1, "use_gpu": True,
                                                                      "gpus_per_worker": 0.25}},
                            members=[{"arch": "resnet50", "recipe": "a", "seed": 0,
                                      "resources": {"workers": 2, "gpus_per_worker": 1}},
                                     {"arch": "resnet18", "recipe": "a"}]))
    big, small = resolve_members(cfg)
    assert (big.resources.use_gpu, big.resources.workers, big.resources.gpus_per_worker) == (True, 2, 1)
    assert (small.resources.use_gpu, small.resources.workers, small.resources.gpus_per_worker) == (True, 1, 0.25)
    assert big.resources.cpus_per_worker == 1.0  # built-in, under both


def test_a_gpu_share_without_use_gpu_is_refused():
    cfg = parse_config(base(members=[{"arch": "resnet18", "recipe": "a", "resources": {"gpus_per_worker": 0.5}}]))
    with pytest.raises(UserError, match="gpus_per_worker is 0.5 but use_gpu is false"):
        resolve_members(cfg)
    # a member that turns the defaults' GPU off may say so with a zero share
    cpu = parse_config(base(defaults={"resources": {"use_gpu": True, "gpus_per_worker": 0.5}},
                            members=[{"arch": "resnet18", "recipe": "a",
                                      "resources": {"use_gpu": False, "gpus_per_worker": 0}}]))
    assert resolve_members(cpu)[0].resources.use_gpu is False


@pytest.mark.parametrize("member,size,low_res", [
    ({"input_size": 64}, 64, True),
    ({"input_size": 32}, 32, True),
    ({"input_size": 224}, 224, False),   # an ImageNet member keeps the ImageNet stem
    ({}, 224, False),                    # neither set: the native size, low_res off
    ({"low_res": True}, 64, True),
    ({"low_res": False, "input_size": 64}, 64, False),
])
def test_low_res_follows_the_input_size_unless_set(member, size, low_res):
    m = resolve_members(parse_config(base(members=[{"arch": "resnet18", "recipe": "a", **member}])))[0]
    assert (m.input_size, m.low_res) == (size, low_res)


def test_dry_run_prints_input_size_low_res_and_where_the_data_goes(tmp_path, tiny_root):
    path = tmp_path / "c.yaml"
    cfg = base(members=[{"arch": "resnet18", "recipe": "a", "input_size": 224, "name": "big"},
                        {"arch": "resnet18", "recipe": "a", "input_size": 64, "name": "small"}],
               data={"root": tiny_root, "classes": 3, "train_per_class": 10})
    path.write_text(yaml.safe_dump(cfg))
    import io

    from rich.console import Console

    import orchestrator.drivers.ensemble_job as job

    buf = io.StringIO()
    old, job.console = job.console, lambda: Console(file=buf, width=200)
    try:
        job.print_plan(load_config(str(path)), resolve_members(load_config(str(path))))
    finally:
        job.console = old
    rows = [line for line in buf.getvalue().splitlines() if "│" in line]
    lines = {line.split("│")[1].strip(): line for line in rows}
    assert "224 px" in lines["big"] and " off " in lines["big"]
    assert "64 px" in lines["small"] and " on " in lines["small"]
    assert "train data, 2 of 2 members: resident on cpu (30 images of 64x64 px = 0.4 MiB uint8)" in buf.getvalue()
