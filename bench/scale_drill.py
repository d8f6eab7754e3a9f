"""ImageNet scale, drilled on one machine: what one validation pass reads.

    python bench/scale_drill.py                    # generates the full 1.28M + 50k set first
    python bench/scale_drill.py --scale 0.01       # same structure, 1% of the samples
    python bench/scale_drill.py --data /tmp/ims    # a set made by bench/imagenet_shaped.py

On the ImageNet-shaped set of `bench/imagenet_shaped.py` (1,000 classes, ILSVRC-2012's
per-class spread, val in 64+ shards), for a cluster of `--ranks` x `--loaders` reader
slots (default 8 x 4), one run measures:
- the bytes one validation pass reads over all slots, as a multiple of the split's size,
  for the evaluation's reader (`Split.iter_indexed`: shard by shard, one slot per shard)
  and for the former one (every slot streams every shard and keeps every n-th sample);
- that the slots' parts hold every val sample exactly once, at its dataset index, with
  the label the manifest's labels file gives;
- the split's labels from the labels file against one pass over the shards (time, equal);
- the build rate and size of a teacher's CAM file (`orchestrator/train/cam.py`) on
  `--cam-images` train images, extrapolated to the whole train split;
- one label-shuffled training pass of the streamed train split over `--ranks` ranks x
  `--loaders` loaders (Hikvision's rule: N draws of every class, N its largest): draws per
  class and per rank, and the bytes read, as a multiple of the train split's size;
- what a member start reads for its minival (`--minival` per class), in fresh processes
  sharing one data cache: the first carves it from train (`orchestrator/data/minival_store.py`),
  a later one reads the stored minival only; bytes as a multiple of the minival's own
  size, and each process's peak RSS;
- peak memory of a bounded training run (`--steps` steps of a ResNet-20 at 32 px through
  the training core, `train_member`, label-shuffled on the streamed split, 2 loader
  processes), in a fresh process: the trainer's peak RSS and its loaders' (VmHWM), on the
  full set and on a 1% set of the same structure, so the ratio shows what grows with N.
The last line is the figure: `... worst read ratio W` (the larger of the two passes' ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.imagenet_shaped import generate  # noqa: E402
from orchestrator.data import dataset  # noqa: E402
from orchestrator.data.dataset import open_split  # noqa: E402
from orchestrator.data.manifest import load_manifest  # noqa: E402


class ReadCounter:
    """Counts the bytes of every shard a reader opens (a gzip shard is read whole)."""

    def __init__(self, split):
        self.size = {split.manifest.url(s): s.bytes for s in split.manifest.shards(split.shard_split)}
        self.bytes, self._real = 0, dataset.iter_shard

    def __enter__(self):
        def counting(url, sha256=None):
            self.bytes += self.size[url]
            return self._real(url, sha256)

        dataset.iter_shard = counting
        return self

    def __exit__(self, *exc):
        dataset.iter_shard = self._real


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (getrusage's ru_maxrss
    carries the parent's peak into a child started by fork + exec, so a fresh interpreter
    would report the drill's own peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB


def val_pass(split, slots: int) -> tuple[int, np.ndarray]:
    """Bytes read and the label seen at every index, over all slots of one pass."""
    seen = np.full(len(split), -1, dtype=np.int64)
    with ReadCounter(split) as count:
        for me in range(slots):
            for index, s in split.iter_indexed(me, slots):
                if seen[index] != -1:
                    raise SystemExit(f"sample {index} read by two slots")
                seen[index] = s.label
    return count.bytes, seen


def former_pass(split, slots: int) -> int:
    """What the former reader read: every slot streams the whole split."""
    with ReadCounter(split) as count:
        for me in range(slots):
            for _ in split.iter_samples(keep=lambda i, me=me: i % slots == me):
                pass
    return count.bytes


def shuffled_pass(train, ranks: int, loaders: int) -> tuple[np.ndarray, list[int], int]:
    """Per-class draws, per-rank lengths and bytes read by one label-shuffled pass."""
    from orchestrator.data.streams import TrainStream

    per_class = np.zeros(train.num_classes, dtype=np.int64)
    per_rank = []
    with ReadCounter(train) as count:
        for rank in range(ranks):
            stream = TrainStream(train, None, rank, ranks, seed=0, label_shuffling=True)
            got = np.array([s.label for slot in range(loaders) for s in stream._one_pass(0, slot, loaders)])
            per_rank.append(len(got))
            per_class += np.bincount(got, minlength=train.num_classes)
    return per_class, per_rank, count.bytes


def cam_build(train, n: int, workers: int = 2) -> tuple[float, int]:
    """(images/s, bytes per image) of building a teacher's CAM file over the first n train
    images (rounded down to whole batches), decoded by `workers` loader processes as a
    member's build does (`cam_batches`)."""
    import itertools

    import torch

    from models import build_model
    from orchestrator.train.cam import cam_batches, write_cam_maps

    teacher = build_model("resnet18", num_classes=train.num_classes, low_res=True)
    batch = 128
    n = max(batch, n // batch * batch)
    batches = cam_batches(train, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), workers, batch)
    with tempfile.TemporaryDirectory() as folder:
        start = time.time()
        maps = write_cam_maps(folder, teacher, itertools.islice(batches, n // batch), n, torch.device("cpu"))
        rate = n / (time.time() - start)
        return rate, int(maps.maps[0].nbytes)


def _children_hwm(seen: dict) -> None:
    """Record the peak RSS (VmHWM, KiB) of every live child of this process."""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            if ppid != me:
                continue
            with open(f"/proc/{pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            seen[pid] = max(seen.get(pid, 0), hwm)
        except (OSError, IndexError, StopIteration, ValueError):
            continue  # not a process, or gone


def bounded_run(root: str, steps: int) -> dict:
    """`steps` label-shuffled steps of a small member on the streamed train split, through
    the training core; peak RSS of this process and of its loader processes (MB)."""
    import threading

    import torch

    from orchestrator.config import parse_config, resolve_members
    from orchestrator.train.member import open_member_data, train_member

    cfg = parse_config({
        "name": "drill", "data": {"root": root, "val_per_class": 1, "resident": False},  # the streaming path
        "recipes": {"r": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": steps, "label_shuffling": True,
                          "augment": {"preset": "light"}}},
        "defaults": {"input_size": 32, "resources": {"loader_workers": 2}},
        "members": [{"arch": "resnet20", "recipe": "r"}]})
    (member,) = resolve_members(cfg)
    torch.set_num_threads(1)
    seen: dict = {}
    done = threading.Event()

    def watch():
        while not done.wait(0.5):
            _children_hwm(seen)

    threading.Thread(target=watch, daemon=True).start()
    start = time.time()
    _, state = train_member(member, open_member_data(cfg.data), device=torch.device("cpu"))
    done.set()
    return {"steps": state.step, "seconds": time.time() - start, "trainer_mb": peak_rss_mb(),
            "loader_mb": max(seen.values(), default=0) / 1024, "loaders": len(seen)}


def member_start(root: str, minival_per_class: int) -> dict:
    """What one member start reads for its minival (a member opening its data with
    `data.minival`): bytes of train shards, bytes of the stored minival, the minival's own
    bytes, and this process's peak RSS (MB)."""
    from orchestrator.config import parse_config
    from orchestrator.data import minival_store
    from orchestrator.train.member import open_member_data

    cfg = parse_config({"name": "drill", "data": {"root": root, "val_per_class": 1, "minival": minival_per_class},
                        "recipes": {"r": {"epochs": 1}}, "members": [{"arch": "resnet20", "recipe": "r"}]})
    train = {s.file for s in load_manifest(root).shards("train")}
    stored = sum(f.stat().st_size for f in (minival_store.cache_root() / "minival").glob("*.[bj]*"))
    shard_bytes, real = [0], dataset.iter_shard

    def counting(url, sha256=None):
        if os.path.basename(url) in train:
            shard_bytes[0] += os.path.getsize(url)
        return real(url, sha256)

    dataset.iter_shard = counting
    start = time.time()
    data = open_member_data(cfg.data)
    return {"train_shard_bytes": shard_bytes[0], "stored_bytes": stored, "seconds": time.time() - start,
            "minival_bytes": sum(len(s.data) for s in data.minival.records), "samples": len(data.minival.records),
            "rss_mb": peak_rss_mb()}


def measured_start(root: str, minival_per_class: int, cache: str) -> dict:
    """member_start in a fresh interpreter (a member process) with its own data cache."""
    out = subprocess.run([sys.executable, __file__, "--member-start", root, "--minival", str(minival_per_class)],
                         capture_output=True, text=True, check=True, env={**os.environ, "ENSEMBLE_DATA_CACHE": cache})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured_run(root: str, steps: int) -> dict:
    """bounded_run in a fresh interpreter, so its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--bounded-run", root, "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="an ImageNet-shaped set (default: generate one in a temporary folder)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--loaders", type=int, default=4)
    p.add_argument("--cam-images", type=int, default=2000, help="train images to build CAM maps of (default 2000)")
    p.add_argument("--steps", type=int, default=200, help="steps of the bounded training run (default 200)")
    p.add_argument("--minival", type=int, default=10, help="minival samples per class of a member start (default 10)")
    p.add_argument("--bounded-run", metavar="ROOT", help=argparse.SUPPRESS)
    p.add_argument("--member-start", metavar="ROOT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bounded_run:
        print(json.dumps(bounded_run(args.bounded_run, args.steps)))
        return
    if args.member_start:
        print(json.dumps(member_start(args.member_start, args.minival)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root, start = tmp, time.time()
            m = generate(root, args.scale)
            size = sum(s["bytes"] for v in m["splits"].values() for s in v["shards"])
            print(f"generated: train {m['splits']['train']['samples']:,}, val {m['splits']['val']['samples']:,} "
                  f"samples ({size / 1e6:.0f} MB) in {time.time() - start:.0f} s; peak RSS {peak_rss_mb():.0f} MB")
        start = time.time()
        load_manifest(root)
        print(f"manifest load: {1000 * (time.time() - start):.0f} ms")
        val = open_split(root, "val")
        slots = args.ranks * args.loaders
        size = sum(s.bytes for s in val.manifest.shards("val"))
        shards = len(val.manifest.shards("val"))

        start = time.time()
        from_file = val.all_labels()
        t_file = time.time() - start
        start = time.time()
        from_pass = np.array([s.label for s in val.iter_samples()])
        t_pass = time.time() - start
        assert np.array_equal(from_file, from_pass), "labels file disagrees with the shards"
        print(f"labels of {len(from_file):,} val samples: from the labels file {t_file:.2f} s, "
              f"from a pass over the shards {t_pass:.2f} s (equal)")

        read, seen = val_pass(val, slots)
        assert (seen >= 0).all(), f"{int((seen < 0).sum())} val samples read by no slot"
        assert np.array_equal(seen, from_file), "a sample's label differs from the labels file"
        busy = min(shards, slots)
        print(f"{args.ranks} ranks x {args.loaders} loaders = {slots} slots over {shards} val shards "
              f"({busy} slots read, {slots - busy} idle): every sample once, at its index, with its label")
        train = open_split(root, "train")
        n_max = int(np.bincount(train.all_labels()).max())
        start = time.time()
        per_class, per_rank, train_read = shuffled_pass(train, args.ranks, args.loaders)
        train_size = sum(s.bytes for s in train.manifest.shards("train"))
        exact = int((per_class == n_max).sum())
        print(f"label-shuffled train pass over {args.ranks} ranks x {args.loaders} loaders in "
              f"{time.time() - start:.0f} s: {exact} of {len(per_class)} classes drawn exactly N = {n_max} times "
              f"(min {per_class.min()}, max {per_class.max()}); ranks' parts {sorted(set(per_rank))}; "
              f"read {train_read / train_size:.3f} x the train split")
        former = former_pass(val, slots)
        cam_rate, cam_bytes = cam_build(train, args.cam_images)
        print(f"CAM maps of {args.cam_images:,} train images (a low-res ResNet-18 teacher at 32 px, CPU, "
              f"2 loader processes decoding): "
              f"{cam_rate:.0f} images/s, {cam_bytes:,} bytes each; for all {len(train):,}: "
              f"{len(train) * cam_bytes / 1e9:.2f} GB float16, {len(train) / cam_rate / 3600:.1f} h on this machine")
        print(f"peak RSS of this process over the drill: {peak_rss_mb():.0f} MB")
        with tempfile.TemporaryDirectory() as cache:
            first, later = (measured_start(root, args.minival, cache) for _ in range(2))
        own = later["minival_bytes"]
        print(f"member start with a minival of {args.minival} per class ({later['samples']:,} samples, "
              f"{own / 1e6:.1f} MB): the first on a machine carves it, reading {first['train_shard_bytes'] / own:.1f} x "
              f"its size in {first['seconds']:.0f} s (peak RSS {first['rss_mb']:.0f} MB); every later start reads "
              f"{(later['train_shard_bytes'] + later['stored_bytes']) / own:.3f} x its size "
              f"({later['train_shard_bytes']:,} bytes of train shards) in {later['seconds']:.1f} s "
              f"(peak RSS {later['rss_mb']:.0f} MB)")
        full = measured_run(root, args.steps)
        with tempfile.TemporaryDirectory() as small_root:
            generate(small_root, args.scale / 100)
            small = measured_run(small_root, args.steps)
        print(f"bounded run ({full['steps']} label-shuffled steps of ResNet-20, batch 64, 32 px, "
              f"{full['loaders']} loader processes (training and held-out), {full['seconds']:.0f} s): trainer peak RSS {full['trainer_mb']:.0f} MB, "
              f"loader {full['loader_mb']:.0f} MB; on a set of {args.scale / 100:g} the size: "
              f"{small['trainer_mb']:.0f} MB and {small['loader_mb']:.0f} MB "
              f"({full['trainer_mb'] / small['trainer_mb']:.2f}x, {full['loader_mb'] / small['loader_mb']:.2f}x)")
        worst = max(read / size, train_read / train_size)
        print(f"val pass reads {read / size:.3f} x the split ({read / 1e6:.1f} of {size / 1e6:.1f} MB; "
              f"former reader: {former / size:.1f} x); worst read ratio {worst:.3f}")


if __name__ == "__main__":
    main()
