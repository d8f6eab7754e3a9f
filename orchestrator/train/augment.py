"""Augmentation presets built from named, searchable fields.

A preset is only a set of default field values; a member config may override any field
(and a Tune search space is a dict of dotted overrides such as
`recipe.augment.color_jitter`). `build_train_transform` turns the resolved fields into a
torchvision v2 pipeline on uint8 images; `build_batch_mix` gives the mixup/cutmix batch
transform. Sources are cited per field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torchvision.transforms import v2

from orchestrator.base.errors import unknown_name
from orchestrator.train.cam import CamGuidedCrop


@dataclass(frozen=True)
class AugmentFields:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized crop area (Szegedy et al. 2015)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the same crop
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.0  # brightness = contrast = saturation strength (0 = off)
    pca_lighting: float = 0.0  # AlexNet PCA lighting noise std (Krizhevsky et al. 2012 use 0.1)
    auto_augment: Literal["none", "autoaugment", "randaugment", "trivialaugment"] = "none"
    randaugment_n: int = 2  # ops per image (Cubuk et al. 2020)
    randaugment_m: int = 9  # magnitude in [0, 30]
    random_erasing: float = 0.0  # probability (Zhong et al. 2020)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing (Zhang et al. 2018); 0 = off
    cutmix_alpha: float = 0.0  # (Yun et al. 2019); 0 = off
    label_smoothing: float = 0.0  # (Szegedy et al. 2016, Inception-v3: 0.1)
    random_interpolation: bool = False  # resize with a random filter per image (Hikvision 2016)


PRESETS: dict[str, dict] = {
    # centre crop only: a baseline and the consistency phase of the Hikvision recipe
    "none": {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0},
    # scale augmentation for small images, where 8% crops of 64 px leave too little
    "light": {"crop_scale": (0.35, 1.0)},
    # the Inception crop + flip used by torchvision's reference recipes
    "standard": {},
    # AlexNet: crops, flips, PCA lighting, plus colour jitter as in later reproductions
    "alexnet": {"pca_lighting": 0.1, "color_jitter": 0.4},
    "autoaugment": {"auto_augment": "autoaugment"},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    # torchvision's "how to train state-of-the-art models" recipe, scaled down
    "strong": {"auto_augment": "trivialaugment", "random_erasing": 0.1, "mixup_alpha": 0.2,
               "cutmix_alpha": 1.0, "label_smoothing": 0.1},
}
FIELD_NAMES = tuple(f.name for f in fields(AugmentFields))


def list_presets() -> list[str]:
    return sorted(PRESETS)


def resolve(preset: str, overrides: dict) -> AugmentFields:
    """Preset defaults, then the member's overrides (each default is defined once above)."""
    if preset not in PRESETS:
        raise unknown_name("augmentation preset", preset, PRESETS)
    unknown = set(overrides) - set(FIELD_NAMES)
    if unknown:
        raise unknown_name("augmentation field", sorted(unknown)[0], FIELD_NAMES)
    values = {**PRESETS[preset], **overrides}
    return AugmentFields(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class PCALighting(torch.nn.Module):
    """AlexNet's lighting noise: add multiples of the RGB principal components of ImageNet
    pixels, with magnitudes ~ N(0, std) times the eigenvalues (Krizhevsky et al. 2012, 4.1;
    eigen-decomposition from fb.resnet.torch)."""

    EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
    EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # float image in [0, 1], CHW
        alpha = torch.randn(3) * self.std
        rgb = (self.EIGVEC * alpha * self.EIGVAL).sum(dim=1)
        return (img + rgb.view(3, 1, 1)).clamp(0, 1)


def _auto_augment(f: AugmentFields) -> list:
    if f.auto_augment == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]
    if f.auto_augment == "randaugment":
        return [v2.RandAugment(num_ops=f.randaugment_n, magnitude=f.randaugment_m)]
    if f.auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    return []


INTERPOLATIONS = (v2.InterpolationMode.NEAREST, v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC)


def plain_fields(f: AugmentFields) -> AugmentFields:
    """The consistency phase of the Hikvision recipe: strong augmentation off (whole-image
    crop as at test time, flip kept), the loss (label smoothing) unchanged."""
    return replace(AugmentFields(), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=f.hflip,
                   label_smoothing=f.label_smoothing)


def _crop(f: AugmentFields, size: int, cam_maps=None, cam_probability: float = 1.0):
    modes = INTERPOLATIONS if f.random_interpolation else (v2.InterpolationMode.BILINEAR,)
    if cam_maps is not None:
        crops = [CamGuidedCrop(size, f.crop_scale, f.crop_ratio, cam_maps, cam_probability, m) for m in modes]
    else:
        crops = [v2.RandomResizedCrop(size, scale=f.crop_scale, ratio=f.crop_ratio, interpolation=m,
                                      antialias=True) for m in modes]
    return crops[0] if len(crops) == 1 else RandomChoiceKeyed(crops)


class RandomChoiceKeyed:
    """One of `ops` per image, uniformly; passes the sample key on to keyed ops."""

    def __init__(self, ops: list):
        self.ops, self.keyed = ops, getattr(ops[0], "keyed", False)

    def __call__(self, img, key=None):
        op = self.ops[int(torch.randint(len(self.ops), (1,)))]
        return op(img, key) if self.keyed else op(img)


class KeyedCompose:
    """A keyed first op (the CAM-guided crop) followed by ordinary transforms."""

    keyed = True

    def __init__(self, first, rest: v2.Compose):
        self.first, self.rest = first, rest

    def __call__(self, img, key):
        return self.rest(self.first(img, key))


def build_train_transform(f: AugmentFields, size: int, mean, std, cam_maps=None, cam_probability: float = 1.0):
    """uint8 CHW image tensor -> normalised float tensor of `size` x `size`. With
    `cam_maps` ({sample key: CAM}) the crop is CAM-guided and the result is a keyed
    transform, called as t(img, key)."""
    crop = _crop(f, size, cam_maps, cam_probability)
    rest = v2.Compose(_after_crop(f, mean, std))
    if getattr(crop, "keyed", False):
        return KeyedCompose(crop, rest)
    return v2.Compose([crop, *rest.transforms])


def _after_crop(f: AugmentFields, mean, std) -> list:
    ops: list = []
    if f.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(f.hflip))
    ops += _auto_augment(f)
    if f.color_jitter > 0:
        s = f.color_jitter
        ops.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if f.pca_lighting > 0:
        ops.append(PCALighting(f.pca_lighting))
    ops.append(v2.Normalize(mean, std))
    if f.random_erasing > 0:
        ops.append(v2.RandomErasing(f.random_erasing))
    return ops


def build_eval_transform(resize: int, crop: int, mean, std) -> v2.Compose:
    """Resize the short side, centre-crop: each member's own eval transform."""
    return v2.Compose([
        v2.Resize(resize, antialias=True), v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


class EvalGeometry:
    """The eval transform's first half on uint8 images (resize the short side, centre-crop);
    `normalize_batch` does the rest on whole batches. Per image this costs half of the
    composed transform (bench/recompute_bench.py), and a uint8 batch crosses to the GPU
    in a quarter of the bytes."""

    def __init__(self, resize: int, crop: int):
        self.resize, self.crop = resize, crop

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W], or a batch of same-sized ones [B, 3, H, W]."""
        from torchvision.transforms.v2 import functional as F

        return F.center_crop(F.resize(img, [self.resize], antialias=True), [self.crop, self.crop])

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images -> one [B, 3, crop, crop] batch: one resize for the whole batch when
        they share a size (Tiny-ImageNet's 64 px: a third of the recompute path's non-model
        time went to per-image resizes), else image by image."""
        if len({tuple(img.shape) for img in images}) == 1:
            return self(torch.stack(images))
        return torch.stack([self(img) for img in images])


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float normalised, as ToDtype(scale=True) + Normalize do per image."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    # (x / 255 - m) / s as one new tensor and two in-place passes: the four temporaries of
    # the plain expression cost 8x as long on CPU (bench/recompute_bench.py)
    return images.float().sub_(255 * m).div_(255 * s)


def build_batch_mix(f: AugmentFields, num_classes: int):
    """Mixup and/or CutMix on a batch, one of them chosen per batch (timm's `Mixup`
    switch); returns None when both are off. Targets become soft labels."""
    mixes = []
    if f.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=f.mixup_alpha, num_classes=num_classes))
    if f.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=f.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
