"""`manifest.json` of a shard folder (format: ../shared/data/README.md).

One manifest per dataset: the class list (index -> wnid, name; sorted-wnid order) and
per split its sample count and shards (file, sha256, bytes, samples), and optionally its
labels file (`labels: {file, sha256}`, int32 .npy in dataset order, written by `prepare`).
Read from a local path, s3:// or any fsspec URL.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec

from orchestrator.base.errors import UserError
from orchestrator.base.storage import join
from orchestrator.data.sources import list_folder_classes, list_folder_split


@dataclass(frozen=True)
class Shard:
    file: str
    samples: int
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class Manifest:
    root: str
    name: str
    classes: list[dict]  # [{"index", "wnid", "name"}]
    splits: dict[str, list[Shard]]
    labels: dict[str, dict] = field(default_factory=dict)  # split -> {"file", "sha256"}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise UserError(f"dataset {self.name!r} has no split {split!r}; valid choices: {', '.join(sorted(self.splits))}")
        return self.splits[split]

    def url(self, shard: Shard) -> str:
        return shard.file if shard.file.startswith(FOLDER_PREFIX) else join(self.root, shard.file)

    def offsets(self, split: str) -> list[int]:
        """Dataset index of each shard's first sample (from the per-shard counts)."""
        out, at = [], 0
        for shard in self.shards(split):
            out.append(at)
            at += shard.samples
        return out

    def split_labels(self, split: str):
        """The split's labels in dataset order from its labels file, or None without one."""
        import hashlib
        import io

        import numpy as np

        entry = self.labels.get(split)
        if entry is None:
            return None
        url = join(self.root, entry["file"])
        try:
            with fsspec.open(url, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise UserError(f"labels file {url} named in the manifest is missing") from None
        if entry.get("sha256") and hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise UserError(f"labels file {url} does not match its sha256 in the manifest")
        labels = np.load(io.BytesIO(blob))
        if len(labels) != sum(s.samples for s in self.shards(split)):
            raise UserError(f"labels file {url} holds {len(labels)} labels; the split's shards hold "
                            f"{sum(s.samples for s in self.shards(split))} samples")
        return labels.astype(np.int64)


FOLDER_PREFIX = "folder:"  # a "shard" standing for a whole split of an ImageFolder layout


def folder_manifest(root: str) -> Manifest:
    """A manifest for an ILSVRC/ImageFolder layout read in place (local folders only)."""
    import os

    wnids = list_folder_classes(root)
    splits = {split: [Shard(f"{FOLDER_PREFIX}{split}", len(list_folder_split(root, split, wnids)))]
              for split in sorted(os.listdir(root)) if split in ("train", "val", "test")
              and os.path.isdir(os.path.join(root, split))}
    return Manifest(root=root, name=os.path.basename(root.rstrip("/")),
                    classes=[{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)], splits=splits)


def load_manifest(root: str) -> Manifest:
    url = join(root, "manifest.json")
    try:
        with fsspec.open(url, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        import os

        if "://" not in root and not os.path.isdir(root):
            raise UserError(f"data folder not found: {root} (set data.root, or DATA_ROOT for the shipped "
                            f"configs)") from None
        if "://" not in root and os.path.isdir(os.path.join(root, "train")):
            return folder_manifest(root)
        raise UserError(f"data path {root!r} has no manifest.json (run `python -m orchestrator.data.prepare` "
                        "to make shards from a folder layout)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{url} is not valid JSON: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # botocore's NoCredentialsError, EndpointConnectionError, ...
        if type(exc).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs"):
            raise
        hint = " (set AWS credentials in the environment or the instance role)" if "Credentials" in type(
            exc).__name__ else ""
        raise UserError(f"cannot read {url}: {type(exc).__name__}{hint}") from None
    try:
        splits = {name: [Shard(s["file"], int(s["samples"]), s.get("sha256"), s.get("bytes")) for s in info["shards"]]
                  for name, info in raw["splits"].items()}
        manifest = Manifest(root=root, name=raw.get("name", root.rstrip("/").rsplit("/", 1)[-1]),
                            classes=raw["classes"], splits=splits,
                            labels={n: info["labels"] for n, info in raw["splits"].items() if info.get("labels")})
    except (KeyError, TypeError) as exc:
        raise UserError(f"{url} is missing field {exc}") from None
    if raw.get("num_classes", manifest.num_classes) != manifest.num_classes:
        raise UserError(f"{url}: num_classes {raw['num_classes']} disagrees with its {manifest.num_classes} classes")
    return manifest


def check_shards_exist(manifest: Manifest, split: str) -> None:
    """Fail before training, not an hour in, when a shard named in the manifest is missing."""
    for shard in manifest.shards(split):
        if shard.file.startswith(FOLDER_PREFIX):
            continue
        fs, path = fsspec.core.url_to_fs(manifest.url(shard))
        if not fs.exists(path):
            raise UserError(f"shard {manifest.url(shard)} named in the manifest is missing")
