"""Test-time augmentation: which image a member sees at test time, and the views cut from it.

Each mode names the canvas decoded from the image (`canvas`: resize the short side,
centre-crop) and the views cut from that canvas (`views`), each at the member's crop:

- `none`: the member's own eval transform (resize, centre crop): one view.
- `flip`: that view and its mirror (2).
- `10crop`: the image resized to crop / 0.875 (AlexNet's 256 for a 224 crop), its central
  square; the 4 corner crops and the centre crop of it, and their mirrors (Krizhevsky et
  al. 2012, 4.1). The canvas is larger than the crop whatever the member's eval resize, so
  the ten crops differ even for a low-res member whose eval resize equals its crop.
- `multiscale`: the same 10 crops at three scales of the canvas, 1, 1.125 and 1.25 x
  crop / 0.875 (GoogLeNet 2014, 6: short side 256, 288, 320, 352 and crops of each; VGG
  2015, 3.2: several test scales Q, their softmaxes averaged): 30 views. One canvas is
  decoded at the largest scale and resized down for the others (the central square is the
  same region at every scale).

The views' softmaxes are averaged (arithmetic mean, as the ILSVRC entries did).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.base.errors import UserError

TTA_VIEWS = {"none": 1, "flip": 2, "10crop": 10, "multiscale": 30}
CROP_FRACTION = 0.875  # crop / resize of the standard ImageNet eval (224 / 256)
SCALES = (1.0, 1.125, 1.25)


def check_mode(tta: str) -> None:
    if tta not in TTA_VIEWS:
        raise UserError(f"unknown test-time augmentation {tta!r}; valid choices: {', '.join(TTA_VIEWS)}")


def base_size(crop: int) -> int:
    return round(crop / CROP_FRACTION)


def canvas(tta: str, resize: int, crop: int) -> tuple[int, int]:
    """(resize of the short side, centre crop) of the decoded image for `tta`."""
    check_mode(tta)
    if tta in ("none", "flip"):
        return resize, crop
    side = base_size(crop) if tta == "10crop" else round(base_size(crop) * SCALES[-1])
    return side, side


def ten_crops(images: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """4 corners, centre, and the mirrors of the five, of a [B, 3, H, W] batch."""
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    five = [images[..., :crop, :crop], images[..., :crop, w - crop:], images[..., h - crop:, :crop],
            images[..., h - crop:, w - crop:], images[..., top:top + crop, left:left + crop]]
    return five + [v.flip(-1) for v in five]


def views(images: torch.Tensor, tta: str, crop: int) -> list[torch.Tensor]:
    """The views of a batch already decoded at `canvas(tta, ...)` (float or uint8)."""
    check_mode(tta)
    if tta == "none":
        return [images]
    if tta == "flip":
        return [images, images.flip(-1)]
    if tta == "10crop":
        return ten_crops(images, crop)
    out = []
    for s in SCALES:
        side = round(base_size(crop) * s)
        scaled = images if side == images.shape[-1] else F.interpolate(
            images.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        out += ten_crops(scaled, crop)
    return out
