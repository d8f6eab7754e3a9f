"""bench/gpu_reproduce.sh, checked before its one GPU call: staged data and wheels, then
every step at toy size on the CPU, in a Python that has the GPU machine's packages
(torch, torchvision, numpy, PyYAML, rich, fsspec, matplotlib) but no pydantic, Ray or
MLflow, as that machine has."""
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

# what the GPU machine lacks (its package list: /work/.library/device/KINDS.md)
ABSENT = ("pydantic", "annotated_types", "typing_inspection", "ray", "mlflow", "boto", "s3fs", "webdataset",
          "moto", "hypothesis", "pydantic_settings")


def bare_python(tmp: Path) -> Path:
    """A venv whose packages are this one's minus ABSENT (symlinked, nothing copied)."""
    venv.create(tmp / "bare", with_pip=False)
    site = next((tmp / "bare" / "lib").glob("python3*/site-packages"))
    packages = tmp / "packages"
    packages.mkdir()
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for entry in ours.iterdir():
        base = entry.name.split("-")[0].split(".")[0].lower()
        if not base.startswith(ABSENT) and not entry.name.endswith(".pth"):
            (packages / entry.name).symlink_to(entry)
    (site / "packages.pth").write_text(str(packages) + "\n")
    return tmp / "bare" / "bin" / "python"


@pytest.mark.timeout(900)
def test_gpu_call_runs_every_step_in_a_bare_python(tiny_root, tmp_path):
    python = bare_python(tmp_path)
    missing = subprocess.run([str(python), "-c", "import pydantic"], capture_output=True, text=True)
    assert missing.returncode != 0 and "pydantic" in missing.stderr
    assert subprocess.run([str(python), "-c", "import torch, torchvision, yaml, pip"]).returncode == 0

    stage = tmp_path / "stage"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    staged = subprocess.run([sys.executable, "bench/gpu_stage.py", "--data", tiny_root, "--python", version,
                             "--out", str(stage)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert staged.returncode == 0, staged.stdout + staged.stderr
    assert re.search(r"a device call carries [\d.]+ MiB \(limit 64 MiB\)", staged.stdout)
    manifest = json.loads((stage / "data" / "tiny-imagenet-200" / "manifest.json").read_text())
    listed = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    assert sorted(listed) == sorted(p.name for p in (stage / "data" / "tiny-imagenet-200").glob("*.tar.gz"))
    assert any(w.name.startswith("pydantic_core-") for w in (stage / "wheels").glob("*.whl"))

    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": str(python), "STAGE": str(stage), "OUT": str(results)}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", "bench/gpu_reproduce.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=840)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (results / "summary.txt").read_text()
    for name in ("reproduce", "repeat-a", "repeat-b", "reproducible", "resident", "packing", "decode"):
        assert f"({name}: exit 0," in summary, summary
    assert re.search(r"ensemble top1 [\d.]+ top5 [\d.]+ best-member top5 [\d.]+ cut", summary), summary
    assert "reproducible: yes (2 members, bitwise equal)" in summary
    assert re.search(r"resident / synthetic: [\d.]+", summary)
    assert re.search(r"platform / plain [\d.]+", summary)
    assert re.search(r"huge / plain peak memory: [\d.]+", summary)
    assert json.loads((results / "report.json").read_text())["dataset"]["samples"] == 100
    assert set(json.loads((results / "packing.json").read_text())["platform_over_plain"]) == {"1", "2"}
    assert (results / "size_curve.png").stat().st_size > 0


def test_gpu_call_refuses_a_missing_stage_and_unknown_options(tmp_path):
    env = {**os.environ, "STAGE": str(tmp_path / "nothing"), "OUT": str(tmp_path / "r")}
    out = subprocess.run(["bash", "bench/gpu_reproduce.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "run: python bench/gpu_stage.py" in out.stderr
    out = subprocess.run(["bash", "bench/gpu_reproduce.sh", "--fast"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "valid: --smoke" in out.stderr
