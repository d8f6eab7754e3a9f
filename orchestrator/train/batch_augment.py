"""Decode and augment whole batches on the training device, after the DataLoader.

Why: at 224 px a ResNet-50 trains at about 4,700 images/s on one H200, while one CPU
thread decodes about 824 ImageNet JPEGs/s (../shared/docs/BACKGROUND.md), so decoding
per image in loader processes needs six or more cores per GPU before augmenting at all.
With `resources.decode: gpu` the loader processes only read encoded bytes; the training
process decodes the batch with nvJPEG (`torchvision.io.decode_jpeg` on a CUDA device,
batched), crops and resizes each image on the GPU, then flips, jitters and normalises
the batch at once. `orchestrator/train/prefetch.py` prepares the next batch on a side CUDA
stream while the current step computes, from a background thread.

The fields are those of the per-image pipeline (`augment.py`) with the same meaning:
crop_scale/crop_ratio (Inception crop), hflip, color_jitter (brightness, contrast,
saturation, in a random order per image), pca_lighting, random_interpolation. AutoAugment-style
policies, random erasing and CAM-guided crops are per-image CPU operations:
`unsupported()` names them, and a member that asks for `decode: gpu` with them is refused.
Everything here also runs on a CPU device (that is how the tests exercise it).
"""
from __future__ import annotations

import io

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from orchestrator.train.augment import AugmentFields, PCALighting

_MODES = ("nearest", "bilinear", "bicubic")  # random_interpolation draws from these, as augment.py does


def unsupported(f: AugmentFields, cam_crops: bool = False) -> list[str]:
    """The fields this batch pipeline cannot apply (they need the per-image CPU one)."""
    out = []
    if f.auto_augment != "none":
        out.append(f"auto_augment={f.auto_augment}")
    if f.random_erasing > 0:
        out.append("random_erasing")
    if cam_crops:
        out.append("cam_crops")
    return out


def jpeg_size(data: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header (its first SOF marker), without decoding;
    None for anything else (it then takes the ordinary path)."""
    b = data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
        i += 2 + length
    return None


def collate_encoded(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate for (encoded bytes, label, pass) samples: the bytes of all images
    in one flat uint8 tensor plus each one's length. One tensor crosses from the loader
    process, not one per image: each tensor passed between processes costs a shared-memory
    segment, and per-image tensors made the training process the bottleneck."""
    lengths = torch.tensor([len(b[0]) for b in batch])
    return torch.cat([b[0] for b in batch]), lengths, torch.tensor([b[1] for b in batch]), \
        torch.tensor([b[2] for b in batch])


def split_encoded(data: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(data, lengths.tolist()))


def crop_box(h: int, w: int, scale, ratio, rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """Inception-style random crop (top, left, height, width): area in `scale` of the
    image, log-uniform aspect ratio in `ratio`; centre crop fallback after 10 tries.
    The sampling of torchvision's RandomResizedCrop.get_params, drawn from Python's
    `random` (seeded per member) because a torch op per draw is slow in this per-image loop."""
    rng = rng or random  # the module's generator, which seed_everything seeds
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class BatchAugment:
    """(encoded images, labels) -> (normalised float batch, labels) on `device`.

    Undecodable images are dropped with their labels and counted in `bad` (the same
    counter the per-image pipeline uses), so a batch may come out smaller."""

    def __init__(self, f: AugmentFields, size: int, mean, std, device: torch.device, bad=None):
        self.f, self.size, self.device, self.bad = f, size, torch.device(device), bad
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.eigval = PCALighting.EIGVAL.to(self.device)
        self.eigvec = PCALighting.EIGVEC.to(self.device)

    @property
    def max_side(self) -> int:
        """Largest side an image keeps on the device: 4x the output (a crop of 8% of the area
        still downscales), at least 512 (ImageNet's typical 500 x 375 untouched)."""
        return max(4 * self.size, 512)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded images, none with a side over `max_side`: the rare oversized JPEG (a
        4000 x 3000 photo is 36 MB decoded, and the batch is padded to its largest image) is
        decoded on the CPU at reduced size (libjpeg's DCT scaling, PIL's draft mode), then
        resized; the rest in one batched nvJPEG call (torchvision's `decode_jpeg` has no
        downscaling option). Device memory then depends on the batch and the output size."""
        sides = [jpeg_size(e) for e in encoded]
        big = {i for i, hw in enumerate(sides) if hw is not None and max(hw) > self.max_side}
        small = [i for i in range(len(encoded)) if i not in big]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        for i in big:
            out[i] = self._decode_reduced(encoded[i])
        if small:
            for i, img in zip(small, self._decode_batch([encoded[i] for i in small])):
                out[i] = img
        return out

    def _decode_batch(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:  # one batched nvJPEG call on CUDA (a loop over libjpeg-turbo on CPU)
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # a corrupt or non-JPEG image fails the whole batch: one by one
            return [self._decode_one(e) for e in encoded]

    def _decode_reduced(self, data: torch.Tensor) -> torch.Tensor | None:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data.numpy().tobytes()))
            img.draft("RGB", (self.max_side, self.max_side))  # decode at 1/2, 1/4 or 1/8 scale
            img = img.convert("RGB")
            img.thumbnail((self.max_side, self.max_side), Image.BILINEAR)
        except OSError:
            if self.bad is not None:
                self.bad.add()
            return None
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(self.device)

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:  # PNG, GIF, CMYK JPEG ...: the CPU decoders, then to the device
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError:
            if self.bad is not None:
                self.bad.add()
            return None

    def crop_resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Each image's random crop resized to size x size: float [B, 3, S, S] in 0..255.

        One `roi_align` over the batch padded to its largest image: bilinear sampling that
        averages ceil(crop/size) samples per output pixel, so a downscale is antialiased as
        torchvision's resize is; a kernel per batch instead of several per image, which
        kept the CPU from feeding the GPU. Random interpolation needs the per-image path."""
        boxes = [crop_box(img.shape[-2], img.shape[-1], self.f.crop_scale, self.f.crop_ratio) for img in images]
        if self.f.random_interpolation or self.device.type != "cuda":  # on CPU the loop is the faster
            return self._per_image(images, boxes)
        return self._roi(images, boxes)

    ROI_GROUP = 64  # images per roi_align call: the padded block is ROI_GROUP x 3 x max_side^2 at most

    def _roi(self, images: list[torch.Tensor], boxes) -> torch.Tensor:
        """`_roi_group` over groups of similar size (sorted by area: little padding)."""
        out = torch.empty(len(images), 3, self.size, self.size, device=self.device)
        order = sorted(range(len(images)), key=lambda k: images[k].shape[-2] * images[k].shape[-1])
        for start in range(0, len(order), self.ROI_GROUP):
            part = order[start:start + self.ROI_GROUP]
            out[part] = self._roi_group([images[k] for k in part], [boxes[k] for k in part])
        return out

    def _roi_group(self, images: list[torch.Tensor], boxes) -> torch.Tensor:
        h, w = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        padded = torch.zeros(len(images), 3, h, w, dtype=torch.uint8, device=self.device)
        for k, img in enumerate(images):
            ih, iw = img.shape[-2:]
            padded[k, :, :ih, :iw].copy_(img)
            # the padding repeats the last column and row: bilinear samples at a crop's right or
            # bottom edge then read the image's edge, not black (as F.interpolate on the image alone)
            padded[k, :, :ih, iw:] = img[:, :, -1:]
            padded[k, :, ih:, :] = padded[k, :, ih - 1:ih, :]
        # half precision on the GPU halves the padded batch's memory; roi_align on CPU needs float32
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        rois = torch.tensor([[k, left, top, left + cw, top + ch] for k, (top, left, ch, cw) in enumerate(boxes)],
                            dtype=dtype).to(self.device, non_blocking=True)
        out = roi_align(padded.to(dtype), rois, (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)
        return out.float().clamp_(0, 255)

    def _per_image(self, images: list[torch.Tensor], boxes) -> torch.Tensor:
        s = self.size
        out = torch.empty(len(images), 3, s, s, device=self.device)
        modes = torch.randint(len(_MODES), (len(images),)) if self.f.random_interpolation else None
        for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes)):
            mode = _MODES[int(modes[k])] if modes is not None else "bilinear"
            crop = img[None, :, top:top + h, left:left + w].float()
            out[k] = F.interpolate(crop, size=(s, s), mode=mode, antialias=mode != "nearest",
                                   **({} if mode == "nearest" else {"align_corners": False}))[0]
        return out.clamp_(0, 255)

    def color(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness, contrast and saturation factors in [1 - s, 1 + s] (x in 0..1),
        applied in a random order per image, as torchvision's ColorJitter draws its order
        (`torch.randperm`) per call: each step computes the three and keeps each image's."""
        s, b = self.f.color_jitter, x.shape[0]
        factors = [torch.empty(b, 1, 1, 1, device=x.device).uniform_(max(0.0, 1 - s), 1 + s) for _ in range(3)]
        order = torch.rand(b, 3, device=x.device).argsort(1)  # image i's k-th step is op order[i, k]
        for k in range(3):
            step = order[:, k].view(-1, 1, 1, 1)
            x = torch.where(step == 0, _brightness(x, factors[0]),
                            torch.where(step == 1, _contrast(x, factors[1]), _saturation(x, factors[2])))
        return x

    def lighting(self, x: torch.Tensor) -> torch.Tensor:
        """AlexNet PCA lighting noise per image (see augment.PCALighting)."""
        alpha = torch.randn(x.shape[0], 3, device=x.device) * self.f.pca_lighting
        rgb = (alpha * self.eigval) @ self.eigvec.T
        return (x + rgb.view(-1, 3, 1, 1)).clamp(0, 1)

    def __call__(self, encoded: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self.decode(encoded)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        labels = labels[keep] if len(keep) < len(decoded) else labels
        return self.augment([decoded[i] for i in keep]), labels.to(self.device, non_blocking=True)

    def augment(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Decoded uint8 images (a list, or a [B, 3, H, W] batch) -> the normalised float
        batch: crop and resize, flip, colour, lighting (the GPU-resident mode starts here)."""
        x = self.crop_resize(list(images)).div_(255)  # a fresh tensor: in place saves a copy
        if self.f.hflip > 0:
            flip = torch.rand(x.shape[0], device=x.device) < self.f.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.f.color_jitter > 0:
            x = self.color(x)
        if self.f.pca_lighting > 0:
            x = self.lighting(x)
        return x.sub_(self.mean).div_(self.std)


# torchvision.transforms.v2.functional's adjust_brightness / _contrast / _saturation, per image
def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * _grey(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * _grey(x)).clamp(0, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: [B, 1, H, W]."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class PassAugment:
    """The main batch pipeline, or the plain one from pass `plain_from_pass` on (strong
    augmentation off for the last epochs); a batch goes by its first sample's pass."""

    def __init__(self, main: BatchAugment, plain: BatchAugment | None = None, plain_from_pass: int | None = None):
        self.main, self.plain, self.plain_from_pass = main, plain, plain_from_pass

    def for_pass(self, p: int) -> BatchAugment:
        plain = self.plain is not None and self.plain_from_pass is not None and p >= self.plain_from_pass
        return self.plain if plain else self.main

    def __call__(self, data, lengths, labels, passes):
        return self.apply(split_encoded(data, lengths), labels, int(passes[0]))

    def apply(self, images: list, labels, p: int):
        return self.for_pass(p)(images, labels)
