"""Stage what `bench/gpu_reproduce.sh` needs on a bare GPU machine into one ignored folder.

    python bench/gpu_stage.py                  # bench/.gpu: data + wheels for the GPU machine's Python
    python bench/gpu_stage.py --python 3.11    # wheels for another Python (the CPU smoke run)

The GPU machine has torch, torchvision, numpy, PyYAML, rich, fsspec and matplotlib but no
pydantic and no network; a call to it carries the working tree and at most 64 MiB in all.
This writes:
  bench/.gpu/data/tiny-imagenet-200/  the first 4 train shards (33,676 images, the plain
                                      reference's subset) and both val shards (all 10,000),
                                      with a manifest that lists exactly those shards;
  bench/.gpu/wheels/                  pydantic and its pure-Python or manylinux wheels for
                                      `--python` (pip download, from the package index);
and checks that the tree plus bench/.gpu fits the 64 MiB a call carries.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64
TRAIN_SHARDS = 4
# pydantic's own pins in this project (pyproject.toml); typing_extensions too, since the
# GPU machine's may be older than pydantic needs
WHEELS = ["pydantic==2.14.3", "pydantic_core==2.50.4", "annotated_types==0.8.0", "typing_inspection==0.4.5",
          "typing_extensions==4.16.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def stage_data(source: Path, dest: Path, train_shards: int) -> int:
    """Copy the first `train_shards` train shards and every val shard; return their bytes."""
    raw = json.loads((source / "manifest.json").read_text())
    splits = raw["splits"]
    keep = {"train": splits["train"]["shards"][:train_shards], "val": splits["val"]["shards"]}
    dest.mkdir(parents=True, exist_ok=True)
    size = 0
    for name, shards in keep.items():
        info = splits[name]
        info.pop("labels", None)  # a labels file covers the whole split; the subset reads labels from its shards
        info.update(shards=shards, samples=sum(s["samples"] for s in shards))
        for key in ("per_class_min", "per_class_max"):
            info.pop(key, None)  # true of the whole split only
        for shard in shards:
            target = dest / shard["file"]
            if not target.exists() or target.stat().st_size != shard["bytes"]:
                shutil.copyfile(source / shard["file"], target)
            size += shard["bytes"]
    raw["splits"] = {n: splits[n] for n in keep}
    raw["note"] = (f"{raw.get('note', '')} Subset for bench/gpu_reproduce.sh: the first {train_shards} train "
                   "shards and all val shards.").strip()
    (dest / "manifest.json").write_text(json.dumps(raw, indent=1))
    return size


def stage_wheels(dest: Path, python: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest), *WHEELS]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd, check=True)


def carried_bytes(staged_in: Path) -> int:
    """Bytes a device call carries: tracked and untracked-not-ignored files, plus the stage."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    staged = sum(p.stat().st_size for p in staged_in.rglob("*") if p.is_file())
    return tree + staged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tiny-imagenet-200"),
                   help="the Tiny-ImageNet shards (default %(default)s)")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version (default %(default)s)")
    p.add_argument("--out", default=str(ROOT / "bench" / ".gpu"))
    args = p.parse_args()
    source = Path(args.data)
    if not (source / "manifest.json").is_file():
        print(f"error: no manifest.json in --data {source} (the Tiny-ImageNet-200 shards)", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    data_bytes = stage_data(source, out / "data" / "tiny-imagenet-200", TRAIN_SHARDS)
    stage_wheels(out / "wheels", args.python)
    wheels = sorted(w.name for w in (out / "wheels").glob("*.whl"))
    total = carried_bytes(out)
    print(f"staged {data_bytes / 2**20:.1f} MiB of shards and {len(wheels)} wheels for Python {args.python} "
          f"in {out}: {', '.join(wheels)}")
    print(f"a device call carries {total / 2**20:.1f} MiB (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB * 2**20:
        print(f"error: {total / 2**20:.1f} MiB exceeds the {LIMIT_MIB} MiB a call carries", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
