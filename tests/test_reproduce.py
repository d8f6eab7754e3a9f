"""bench/reproduce.py at a size CI affords: members trained by the Ray-free core in
parallel processes, a runs file `ensemble.evaluate` reads, the plain-PyTorch baseline
beside them, and the final line with the figure."""
import json
import re
from pathlib import Path

import numpy as np
import yaml

from ensemble import evaluate
from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT, run_cli


def test_reproduce_trains_evaluates_and_prints_its_figure(tiny_root, tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "cpu.yaml").read_text()
                         .replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200", tiny_root))
    raw["data"].update(classes=8, train_per_class=16, val_per_class=8)
    for recipe in raw["recipes"].values():
        recipe["epochs"] = 1
    raw["members"] = [m for m in raw["members"] if m["arch"] in ("resnet20", "vgg8")][::3]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = run_cli("bench/reproduce.py", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"),
                  timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ensemble top1 ([\d.]+) top5 ([\d.]+) best-member top5 ([\d.]+) cut (-?[\d.]+%) "
                     r"\[(-?[\d.]+%), (-?[\d.]+%)\]", last)
    assert m, last
    assert "lowest top-1 at" in out.stdout
    runs = load_runs(str(tmp_path / "out" / "runs.yaml"))
    assert [r.name for r in runs.members] == [f"{x['arch']}-{x['recipe']}-s{x['seed']}" for x in raw["members"]]
    labels = np.load(runs.dataset.labels)
    for r in runs.members:
        probs = np.load(r.predictions)
        assert probs.shape == (64, 8) and abs(float((probs.argmax(1) != labels).mean()) - r.metrics["top1_err"]) < 1e-9
        assert np.load(r.minival_predictions).shape == (40, 8)  # 5 per class held out of train: the runs file has them
    assert runs.minival is not None and np.load(runs.minival.labels).shape == (40,)

    # the final line, recomputed from the runs file it wrote: ensemble errors, the best member
    # as the minival chose it, the cut and its interval relative to that member's top-5 error
    assert evaluate.main(["--members", str(tmp_path / "out" / "runs.yaml"), "--out", str(tmp_path / "again"),
                          "--json", str(tmp_path / "again.json"), "--no-mlflow", "--random-orders", "0"]) == 0
    report = json.loads((tmp_path / "again.json").read_text())
    e = report["ensemble"]
    assert e["best_member_chosen_on"] == "minival"
    best5 = next(x for x in report["members"] if x["name"] == e["best_member_top5"])["top5_err"]
    assert (m.group(1), m.group(2), m.group(3)) == (f"{e['top1_err']:.4f}", f"{e['top5_err']:.4f}", f"{best5:.4f}")
    if best5 > 0:
        lo, hi = e["gain_top5_over_best_ci"]
        assert m.group(4, 5, 6) == (f"{e['gain_top5_over_best'] / best5:.1%}", f"{lo / best5:.1%}", f"{hi / best5:.1%}")
    assert f"best member (chosen on the minival): top-1 {e['best_member_top1']} " in out.stdout

    # the plain baseline: like for like with the first ResNet-20, on exactly its training images
    twin = "resnet20-adamw-flips-s9"
    line = next(x for x in out.stdout.splitlines() if x.startswith("plain PyTorch"))
    assert line.startswith(f"plain PyTorch resnet20, like for like with member {twin} (its recipe, its 88 training "
                           f"images, the same 64 val images, ties as misses): top-1 ")
    spec = json.loads((tmp_path / "out" / "baseline_member.json").read_text())
    from orchestrator.config import load_config, resolve_members
    from orchestrator.train.member import open_member_data

    cfg = load_config(str(tmp_path / "c.yaml"))
    member = next(x for x in resolve_members(cfg) if x.name == twin)
    data = open_member_data(cfg.data, member.share)
    assert spec["train_keys"] == [s.key for s in data.train.iter_samples()]
    assert not set(spec["train_keys"]) & {s.key for s in data.minival.iter_samples()}
    assert spec["recipe"]["optimizer"] == member.recipe.optimizer.model_dump(mode="json")
    assert spec["recipe"]["augment"]["hflip"] == 0.5 and spec["recipe"]["augment"]["crop_scale"] == [1.0, 1.0]
    mine = next(r for r in runs.members if r.name == twin).metrics
    assert f"the member: top-1 {mine['top1_err']:.4f}, top-5 {mine['top5_err']:.4f}" in line


def test_the_plain_baseline_counts_a_tie_with_the_true_class_as_a_miss():
    import torch

    from bench.plain_baseline import errors

    probs = torch.full((4, 10), 0.1)  # every class tied
    probs[1] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0])
    labels = torch.tensor([0, 0, 3, 9])
    # row 1: class 0 alone on top (a hit); rows 0, 2, 3: the true class ties with 9 others (misses,
    # where topk would count some as hits)
    assert errors(probs, labels) == (0.75, 0.75)
    # row 1's class 3: below class 0 and tied with four others, five at least as likely: a top-5 miss
    assert errors(probs, torch.tensor([0, 3, 0, 0])) == (1.0, 1.0)


def test_members_start_only_as_the_running_shares_leave_room():
    """reproduce's scheduler on one device: a member with a share of 1 runs alone, quarter
    members four at once, and results come back in the members' order."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from bench.reproduce import run_packed

    lock, live, peak, alone, quarters = threading.Lock(), [0.0], [0.0], [], [0, 0]

    def member(i, share):
        with lock:
            live[0] += share
            peak[0] = max(peak[0], live[0])
            alone.append((i, live[0] == share))
            if share == 0.25:
                quarters[0] += 1
                quarters[1] = max(quarters[1], quarters[0])
        time.sleep(0.05)
        with lock:
            live[0] -= share
            quarters[0] -= share == 0.25
        return i

    shares = [0.5, 0.5, 1.0, 0.25, 0.25, 0.25, 0.25, 0.25, 1.0]
    with ThreadPoolExecutor(max_workers=4) as pool:
        out = run_packed(pool, [(member, i, s) for i, s in enumerate(shares)], shares)
    assert out == list(range(len(shares)))
    assert peak[0] <= 1.0 + 1e-9
    assert all(ok for i, ok in alone if shares[i] == 1.0)  # the whole-device members ran alone
    assert quarters[1] == 4  # the quarter members ran four at once


def test_the_planner_decides_each_members_share_from_its_probe(tmp_path):
    """reproduce --gpu: the probed memory and solo rate go through the planner's
    apply_packing: a small member packs four to a GPU (gain), a big one two (memory), one
    that fills the GPU alone is not packed, a fixed share is kept."""
    from bench.reproduce import planned_shares
    from orchestrator.config import load_config, resolve_members

    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "gpu.yaml").read_text())
    raw["members"] = [{"arch": "resnet18", "recipe": "cosine", "seed": 0}, {"arch": "resnet34", "recipe": "cosine", "seed": 0},
                      {"arch": "vgg11_bn", "recipe": "cosine", "seed": 0},
                      {"arch": "wrn16_4", "recipe": "cosine", "seed": 0, "resources": {"gpus_per_worker": 0.5}}]
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "gpu.yaml"))
    members = resolve_members(cfg)
    probes = [{"name": members[0].name, "images_per_s": 2000.0, "gpu_memory_gb": 6.0},
              {"name": members[1].name, "images_per_s": 1000.0, "gpu_memory_gb": 30.0},
              {"name": members[2].name, "images_per_s": 1e6, "gpu_memory_gb": 6.0},
              {"name": members[3].name, "images_per_s": 2000.0, "gpu_memory_gb": 6.0}]
    shares, reasons = planned_shares(cfg, members, probes, 80.0, 200, 16)
    assert shares == [0.25, 0.5, 1.0, 0.5]
    assert "by gain" in reasons[members[0].name] and "by memory" in reasons[members[1].name]
    assert "fills the GPU alone" in reasons[members[2].name] and members[3].name not in reasons


def test_probe_measures_each_member_shape_once_with_the_training_core(tiny_root, tmp_path):
    """The probe's figures come from the training core's step on the member's own network
    and batch; members of one shape share a probe."""
    from bench.reproduce import probe
    from orchestrator.config import load_config, resolve_members

    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "smoke.yaml").read_text()
                         .replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200", tiny_root))
    raw["recipes"]["short"]["batch_size"] = 4
    raw["members"].append({"arch": "resnet20", "recipe": "short", "seed": 5})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    members = resolve_members(load_config(str(tmp_path / "c.yaml")))
    out = probe([{"member": m.model_dump(), "device": "cpu", "classes": 10} for m in members], steps=2)
    assert [p["name"] for p in out] == [m.name for m in members]
    assert all(p["images_per_s"] > 0 and p["gpu_memory_gb"] is None for p in out)
    assert out[0]["images_per_s"] == out[2]["images_per_s"] != out[1]["images_per_s"]  # resnet20 probed once


def test_the_baseline_and_the_estimate_count_the_images_members_train_on(tiny_root, tmp_path):
    """A minival is carved from train and not trained on; without `train_per_class` the
    counts are the manifest's, class by class."""
    from bench.reproduce import trained_per_class
    from orchestrator.config import load_config
    from orchestrator.data.manifest import load_manifest

    raw = yaml.safe_load((ROOT / "configs" / "reproduce" / "smoke.yaml").read_text()
                         .replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200", tiny_root))
    raw["data"].update(train_per_class=20, minival=5)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    assert trained_per_class(load_config(str(tmp_path / "a.yaml"))) == [15] * 10
    del raw["data"]["train_per_class"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    manifest = load_manifest(tiny_root)
    assert manifest.split_labels("train") is None  # this test set has no labels file: the mean per class
    mean = sum(s.samples for s in manifest.shards("train")) // manifest.num_classes
    assert trained_per_class(load_config(str(tmp_path / "b.yaml"))) == [mean - 5] * 10
    # with a labels file (as `prepare` writes one), the counts are per class
    import json

    root = tmp_path / "labelled"
    root.mkdir()
    total = sum(s.samples for s in manifest.shards("train"))
    labels = np.arange(total) % 7  # uneven over the first 10 classes: 0-6 only
    np.save(root / "train_labels.npy", labels)
    raw_manifest = json.loads((Path(tiny_root) / "manifest.json").read_text())
    raw_manifest["splits"]["train"]["labels"] = {"file": "train_labels.npy"}
    (root / "manifest.json").write_text(json.dumps(raw_manifest))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "root": str(root)}}))
    counts = trained_per_class(load_config(str(tmp_path / "c.yaml")))
    assert counts == [int((labels == c).sum()) - 5 for c in range(7)] + [0] * 3


def test_the_gpu_size_compares_the_plain_baseline_with_its_first_resnet18():
    """`--gpu`: the baseline's twin is the config's first ResNet-18, whose whole recipe
    (SGD, cosine with warm-up, label smoothing, plain last epochs, bf16) the plain script
    applies; its ResNet-18 has the small-image stem the platform's low-res form has."""
    import torch

    from bench.plain_baseline import build, lr_factor
    from bench.reproduce import baseline_member, unplain
    from models import build_model
    from orchestrator.config import load_config, resolve_members

    members = resolve_members(load_config(str(ROOT / "configs" / "reproduce" / "gpu.yaml")))
    twin = baseline_member(members)
    assert twin.name == "resnet18-cosine-s0" and unplain(twin) == []
    plain, ours = build("resnet18", 200, True), build_model("resnet18", num_classes=200, low_res=True)
    assert plain.conv1.kernel_size == ours.conv1.kernel_size == (3, 3) and isinstance(plain.maxpool, torch.nn.Identity)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
    # the same LR factor at every step as the platform's policy (orchestrator/train/lr.py)
    from orchestrator.train.lr import schedule

    cpu = resolve_members(load_config(str(ROOT / "configs" / "reproduce" / "cpu.yaml")))
    for r in (twin.recipe, baseline_member(cpu).recipe):  # cosine with warm-up; one-cycle
        ours_at = schedule(r.schedule.policy, 800, 100, r.schedule.params)
        plain_at = lr_factor(r.schedule.model_dump(mode="json"), 800, 100)
        assert all(abs(ours_at(s) - plain_at(s)) < 1e-12 for s in range(0, 800, 7)), r.schedule
