"""bench/reproduce.py at a size CI affords: members trained by the Ray-free core in
parallel processes, a runs file `ensemble.evaluate` reads, the plain-PyTorch baseline
beside them, and the final line with the figure."""
import re

import numpy as np
import yaml

from orchestrator.runs_file import load_runs
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
    assert "plain PyTorch ResNet-20 (same data and epochs): top-1 " in out.stdout
    assert "lowest top-1 at" in out.stdout
    runs = load_runs(str(tmp_path / "out" / "runs.yaml"))
    assert [r.name for r in runs.members] == [f"{x['arch']}-{x['recipe']}-s{x['seed']}" for x in raw["members"]]
    labels = np.load(runs.dataset.labels)
    for r in runs.members:
        probs = np.load(r.predictions)
        assert probs.shape == (64, 8) and abs(float((probs.argmax(1) != labels).mean()) - r.metrics["top1_err"]) < 1e-9
    best5 = min(r.metrics["top5_err"] for r in runs.members)
    assert float(m.group(3)) == round(best5, 4)
