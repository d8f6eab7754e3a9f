"""Decode and augment whole batches on the training device, after the DataLoader.

Why: at 224 px a ResNet-50 trains at about 4,700 images/s on one H200, while one CPU
thread decodes about 824 ImageNet JPEGs/s (../shared/docs/BACKGROUND.md), so decoding
per image in loader processes needs six or more cores per GPU before augmenting at all.
With `resources.decode: gpu` the loader processes only read encoded bytes; the training
process decodes the batch with nvJPEG (`torchvision.io.decode_jpeg` on a CUDA device,
batched), crops and resizes each image on the GPU, then flips, jitters and normalises
the batch at once. `Prefetcher` prepares the next batch on a side CUDA stream while the
current step computes (the pattern of NVIDIA's DALI and apex's `data_prefetcher`).

The fields are those of the per-image pipeline (`augment.py`) with the same meaning:
crop_scale/crop_ratio (Inception crop), hflip, color_jitter (brightness, contrast,
saturation, applied in that order), pca_lighting, random_interpolation. AutoAugment-style
policies, random erasing and CAM-guided crops are per-image CPU operations:
`unsupported()` names them, and a member that asks for `decode: gpu` with them is refused.
Everything here also runs on a CPU device (that is how the tests exercise it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

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


def collate_encoded(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """DataLoader collate for (encoded bytes, label, pass) samples: a list of 1-D uint8
    tensors (their lengths differ), the labels and each sample's pass number."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


def crop_box(h: int, w: int, scale, ratio, gen: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Inception-style random crop (top, left, height, width): area in `scale` of the
    image, log-uniform aspect ratio in `ratio`; centre crop fallback after 10 tries.
    The same sampling as torchvision's RandomResizedCrop.get_params."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
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

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:  # one batched nvJPEG call on CUDA (a loop over libjpeg-turbo on CPU)
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # a corrupt or non-JPEG image fails the whole batch: one by one
            return [self._decode_one(e) for e in encoded]

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
        """Each image's random crop resized to size x size: float [B, 3, S, S] in 0..255."""
        f, s = self.f, self.size
        out = torch.empty(len(images), 3, s, s, device=self.device)
        modes = torch.randint(len(_MODES), (len(images),)) if f.random_interpolation else None
        for k, img in enumerate(images):
            top, left, h, w = crop_box(img.shape[-2], img.shape[-1], f.crop_scale, f.crop_ratio)
            mode = _MODES[int(modes[k])] if modes is not None else "bilinear"
            crop = img[None, :, top:top + h, left:left + w].float()
            out[k] = F.interpolate(crop, size=(s, s), mode=mode, antialias=mode != "nearest",
                                   **({} if mode == "nearest" else {"align_corners": False}))[0]
        return out.clamp_(0, 255)

    def color(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness, contrast and saturation factors in [1 - s, 1 + s] (x in 0..1)."""
        s, b = self.f.color_jitter, x.shape[0]

        def factors():
            return torch.empty(b, 1, 1, 1, device=x.device).uniform_(max(0.0, 1 - s), 1 + s)

        x = (x * factors()).clamp(0, 1)
        c = factors()
        x = (c * x + (1 - c) * _grey(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
        sat = factors()
        return (sat * x + (1 - sat) * _grey(x)).clamp(0, 1)

    def lighting(self, x: torch.Tensor) -> torch.Tensor:
        """AlexNet PCA lighting noise per image (see augment.PCALighting)."""
        alpha = torch.randn(x.shape[0], 3, device=x.device) * self.f.pca_lighting
        rgb = (alpha * self.eigval) @ self.eigvec.T
        return (x + rgb.view(-1, 3, 1, 1)).clamp(0, 1)

    def __call__(self, encoded: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self.decode(encoded)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        x = self.crop_resize([decoded[i] for i in keep]) / 255
        if self.f.hflip > 0:
            flip = torch.rand(x.shape[0], device=x.device) < self.f.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.f.color_jitter > 0:
            x = self.color(x)
        if self.f.pca_lighting > 0:
            x = self.lighting(x)
        x = (x - self.mean) / self.std
        labels = labels[keep] if len(keep) < len(decoded) else labels
        return x, labels.to(self.device, non_blocking=True)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: [B, 1, H, W]."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class PassAugment:
    """The main batch pipeline, or the plain one from pass `plain_from_pass` on (strong
    augmentation off for the last epochs); a batch goes by its first sample's pass."""

    def __init__(self, main: BatchAugment, plain: BatchAugment | None = None, plain_from_pass: int | None = None):
        self.main, self.plain, self.plain_from_pass = main, plain, plain_from_pass

    def __call__(self, encoded, labels, passes):
        plain = self.plain is not None and self.plain_from_pass is not None and int(passes[0]) >= self.plain_from_pass
        return (self.plain if plain else self.main)(encoded, labels)


class Prefetcher:
    """Iterator of augmented batches, one batch ahead. On CUDA the next batch's decode
    and augmentation are queued on a side stream, so they overlap the current step's
    compute; the training stream waits for that side stream before using the batch."""

    def __init__(self, raw_batches, augment, device: torch.device):
        self.raw, self.augment = raw_batches, augment
        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self._next = None

    def _prepare(self):
        batch = next(self.raw)
        if self.stream is None:
            return self.augment(*batch)
        with torch.cuda.stream(self.stream):
            return self.augment(*batch)

    def __iter__(self):
        return self

    def __next__(self):
        if self._next is None:
            self._next = self._prepare()
        images, labels = self._next
        if self.stream is not None:
            current = torch.cuda.current_stream()
            current.wait_stream(self.stream)
            images.record_stream(current)  # the allocator must not reuse them for the side stream early
            labels.record_stream(current)
        self._next = self._prepare()
        return images, labels
