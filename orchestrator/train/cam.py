"""Supervised data augmentation: CAM-guided random crops (Hikvision, ILSVRC 2016).

A trained teacher's class activation map (Zhou et al. 2016, "Learning Deep Features for
Discriminative Localization") of the *true* class says where the object is; crop centres
are then sampled in proportion to that map, so random crops keep the object (reported
+0.5 to 0.7 points, ../shared/docs/BACKGROUND.md). CAM needs a global-average-pool head:
map = sum_k w[y, k] * F_k(x, y) over the last feature maps F and the classifier row w[y].
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from orchestrator.base.errors import UserError
from orchestrator.data.streams import KeyedStream


def _feature_hook(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output is the last feature map, and whether a ReLU follows it
    (DenseNet applies it functionally before pooling)."""
    if type(model).__name__ == "VGG":
        raise UserError("cam_crops needs a teacher whose classifier reads globally pooled features; VGG's "
                        "head is an MLP (use a ResNet, DenseNet, GoogLeNet or Inception teacher)")
    if hasattr(model, "features") and hasattr(model, "classifier") and isinstance(model.classifier, nn.Linear):
        return model.features, True  # torchvision DenseNet
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    if pools:
        return pools[-1], False  # hook the pool's *input*
    raise UserError(f"cam_crops needs a teacher with a global-average-pool head (ResNet, DenseNet, GoogLeNet, "
                    f"Inception); {type(model).__name__} has none")


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


@torch.no_grad()
def class_activation_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, h, w] non-negative maps of each image's true class, each summing to 1."""
    model.eval()
    module, relu = _feature_hook(model)
    grabbed: list[torch.Tensor] = []
    is_pool = isinstance(module, nn.AdaptiveAvgPool2d)
    hook = module.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0] if is_pool else out))
    try:
        model(images)
    finally:
        hook.remove()
    feats = F.relu(grabbed[-1]) if relu else grabbed[-1]
    weight = _classifier(model).weight  # [classes, channels]
    if weight.shape[1] != feats.shape[1]:
        raise UserError(f"cam_crops: the classifier of {type(model).__name__} does not read the pooled features "
                        f"directly ({weight.shape[1]} inputs, {feats.shape[1]} channels)")
    cams = torch.einsum("bkhw,bk->bhw", feats.float(), weight[labels].float()).clamp(min=0)
    total = cams.flatten(1).sum(1).view(-1, 1, 1)
    uniform = torch.full_like(cams, 1.0 / cams[0].numel())
    return torch.where(total > 0, cams / total.clamp(min=1e-12), uniform)


def sample_centres(cam: torch.Tensor, n: int, height: int, width: int, generator=None) -> torch.Tensor:
    """n crop centres (x, y) in pixels, with density proportional to `cam` stretched over
    the image: pick a map cell with probability cam[cell], then a uniform point in it."""
    h, w = cam.shape
    cells = torch.multinomial(cam.flatten().float(), n, replacement=True, generator=generator)
    jitter = torch.rand(n, 2, generator=generator)
    x = ((cells % w).float() + jitter[:, 0]) * (width / w)
    y = ((cells // w).float() + jitter[:, 1]) * (height / h)
    return torch.stack([x, y], dim=1)


def centred_crop_box(centre: tuple[float, float], scale, ratio, height: int, width: int, generator=None):
    """A random-resized-crop box (area fraction in `scale`, aspect in `ratio`, as in
    Szegedy et al. 2015) centred on `centre`, shifted to lie inside the image."""
    area = height * width * float(torch.empty(1).uniform_(*scale, generator=generator))
    log_r = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = math.exp(float(log_r))
    cw = min(width, max(1, round(math.sqrt(area * aspect))))
    ch = min(height, max(1, round(math.sqrt(area / aspect))))
    left = min(max(0, round(centre[0] - cw / 2)), width - cw)
    top = min(max(0, round(centre[1] - ch / 2)), height - ch)
    return top, left, ch, cw


class CamGuidedCrop:
    """Random-resized crop whose centre follows the sample's CAM (a `keyed` transform:
    called with the sample's key). Samples without a map, and a `1 - probability` share
    of the rest, get the ordinary random-resized crop."""

    keyed = True

    def __init__(self, size: int, scale, ratio, maps: dict[str, torch.Tensor], probability: float = 1.0,
                 interpolation=v2.InterpolationMode.BILINEAR):
        self.size, self.scale, self.ratio, self.maps, self.probability = size, scale, ratio, maps, probability
        self.interpolation = interpolation
        self.plain = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation,
                                          antialias=True)

    def __call__(self, img: torch.Tensor, key: str) -> torch.Tensor:
        cam = self.maps.get(key)
        if cam is None or float(torch.rand(1)) >= self.probability:
            return self.plain(img)
        height, width = img.shape[-2:]
        centre = sample_centres(cam, 1, height, width)[0].tolist()
        top, left, ch, cw = centred_crop_box(centre, self.scale, self.ratio, height, width)
        return v2.functional.resized_crop(img, top, left, ch, cw, [self.size, self.size],
                                          interpolation=self.interpolation, antialias=True)


def cam_input(input_size: int, mean, std):
    """The teacher's view of a sample for its CAM: the whole image resized to the
    teacher's input (no centre crop), so the map covers all of it."""
    return v2.Compose([v2.Resize((input_size, input_size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


def cam_batches(split, input_size: int, mean, std, workers: int, batch_size: int = 128) -> DataLoader:
    """(keys, images, labels) batches of every sample of `split` once, decoded and resized by
    `workers` loader processes, each reading its own shards (`KeyedStream`)."""
    return DataLoader(KeyedStream(split, cam_input(input_size, mean, std)), batch_size=batch_size,
                      num_workers=workers, pin_memory=torch.cuda.is_available())


class CamMaps:
    """The CAMs of a split as one float16 array [N, h, w] on disk, memory-mapped, looked up
    by sample key through a sorted key table (memory-mapped too): built once per teacher
    and split, then every training process and loader shares the same pages instead of
    holding a dict of tensors each (about 0.9 GB per process at 1.28M images)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.maps = np.load(f"{folder}/maps.npy", mmap_mode="r")
        self.keys = np.load(f"{folder}/keys.npy", mmap_mode="r")  # sorted, fixed-width bytes
        self.rows = np.load(f"{folder}/rows.npy", mmap_mode="r")  # row of maps for each sorted key

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return (k.decode() for k in self.keys)

    def get(self, key: str) -> torch.Tensor | None:
        k = key.encode()
        i = int(np.searchsorted(self.keys, k))
        if i == len(self.keys) or self.keys[i] != k:
            return None
        return torch.from_numpy(np.array(self.maps[int(self.rows[i])]))

    def values(self):
        return (self.get(k) for k in self)


@torch.no_grad()
def write_cam_maps(folder: str, teacher: nn.Module, batches, count: int, device) -> CamMaps:
    """Compute the CAMs of `count` samples in one pass over `batches` ((keys, images,
    labels), as `cam_batches` makes them) straight into `folder`'s files (maps written as
    they are computed, not held), then open them as `CamMaps`. Written under a temporary
    name and renamed, so a reader never sees half a file."""
    os.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/maps.partial.npy"
    out, keys, row = None, [], 0
    teacher = teacher.to(device).eval()
    for batch_keys, images, labels in batches:
        cams = class_activation_maps(teacher, images.to(device), labels.to(device)).to(torch.float16).cpu()
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(count, *cams.shape[1:]))
        if row + len(batch_keys) > count:
            raise RuntimeError(f"CAM maps: more than the {count} samples expected (a shard read twice?)")
        out[row:row + len(batch_keys)] = cams.numpy()
        keys.extend(batch_keys)
        row += len(batch_keys)
    if row != count:
        raise RuntimeError(f"CAM maps: {row} samples computed, {count} expected")
    out.flush()
    del out
    table = np.array(keys, dtype="S")
    order = np.argsort(table, kind="stable")
    np.save(f"{folder}/keys.npy", table[order])
    np.save(f"{folder}/rows.npy", order.astype(np.int64))
    os.replace(tmp, f"{folder}/maps.npy")
    return CamMaps(folder)
