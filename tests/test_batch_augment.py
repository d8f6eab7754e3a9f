"""The batch decode/augment pipeline (`resources.decode: gpu`), exercised on a CPU device:
it matches the per-image pipeline where both are deterministic, skips and counts bad
images, and trains a member end to end."""
import io
import math
import random

import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg

from orchestrator.config import parse_config, resolve_members
from orchestrator.data.dataset import BadImages, decode_rgb, open_split
from orchestrator.base.errors import UserError
from orchestrator.train import augment, batch_augment
from orchestrator.train.prefetch import Prefetcher
from orchestrator.train.member import decode_on_device, open_member_data, train_member

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoded(img: torch.Tensor) -> torch.Tensor:
    return encode_jpeg(img, quality=95)


def test_whole_image_crop_matches_the_per_image_pipeline(tiny_root):
    split = open_split(tiny_root, "val", classes=2, per_class=4)
    raw = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in split.records]
    labels = torch.tensor([s.label for s in split.records])
    fields = augment.resolve("none", {})  # crop = whole image, no flip: both pipelines deterministic
    batch, out_labels = batch_augment.BatchAugment(fields, 48, MEAN, STD, CPU)(raw, labels)
    per_image = augment.build_train_transform(fields, 48, MEAN, STD)
    expected = torch.stack([per_image(decode_rgb(s.data)) for s in split.records])
    assert batch.shape == (8, 3, 48, 48) and batch.dtype == torch.float32
    assert torch.equal(out_labels, labels)
    # same decode (libjpeg) and antialiased bilinear resize; uint8 rounding in v2 vs float here
    assert (batch - expected).abs().mean() < 0.02


def test_prefetcher_hands_over_every_batch_then_stops_and_reraises():
    batches = [batch_augment.collate_encoded([(encoded(torch.full((3, 16, 16), v, dtype=torch.uint8)), v, 0)] * 2)
               for v in (10, 200)]
    aug = batch_augment.PassAugment(batch_augment.BatchAugment(augment.resolve("none", {}), 8, (0, 0, 0),
                                                               (1, 1, 1), CPU))
    got = list(Prefetcher(iter(batches), aug, CPU))
    assert [int(labels[0]) for _, labels in got] == [10, 200]
    assert got[0][0].mean() < 0.1 < 0.7 < got[1][0].mean()

    def broken(*_):
        raise ValueError("augmentation failed")

    with pytest.raises(ValueError, match="augmentation failed"):
        next(Prefetcher(iter(batches), broken, CPU))


def test_a_closed_prefetcher_stops_its_thread_mid_stream():
    # a trial process trains member after member: an abandoned endless stream must not
    # keep a thread (and its batches) alive
    endless = ((torch.zeros(2), torch.zeros(2)) for _ in iter(int, 1))
    with Prefetcher(endless, lambda x, y: (x, y), CPU) as batches:
        next(batches)
        thread = batches.thread
    assert not thread.is_alive()


def test_flip_jitter_and_lighting_stay_in_range_and_flip_mirrors():
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    img[:, :, :20] = 0  # left half black: a flip moves it right
    fields = augment.resolve("none", {"hflip": 1.0})
    x, _ = batch_augment.BatchAugment(fields, 40, (0, 0, 0), (1, 1, 1), CPU)([encoded(img)], torch.tensor([3]))
    assert x[0, :, :, :18].mean() > 0.3 and x[0, :, :, 22:].mean() < 0.05
    strong = augment.resolve("alexnet", {"random_interpolation": True})
    x, _ = batch_augment.BatchAugment(strong, 32, (0, 0, 0), (1, 1, 1), CPU)([encoded(img)] * 16,
                                                                          torch.arange(16))
    assert x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1  # jitter/lighting clamp to [0, 1]
    assert x.std(dim=0).mean() > 0.01  # each image got its own crop and factors


def test_batched_roi_crop_matches_the_per_image_resize():
    """The GPU's one-kernel crop (roi_align over the padded batch) against the per-image
    antialiased resize, on the same crops of different-sized images."""
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=gen), size=(120, 160), mode="bilinear")
    images = [(base[0, :, :h, :w] * 255).to(torch.uint8) for h, w in ((120, 160), (100, 90), (64, 64))]
    aug = batch_augment.BatchAugment(augment.resolve("standard", {}), 48, MEAN, STD, CPU)
    boxes = [batch_augment.crop_box(i.shape[-2], i.shape[-1], (0.3, 1.0), (3 / 4, 4 / 3), random.Random(k))
             for k, i in enumerate(images)]
    roi, loop = aug._roi(images, boxes), aug._per_image(images, boxes)
    assert roi.shape == loop.shape == (3, 3, 48, 48)
    assert (roi - loop).abs().mean() < 2.0  # in 0..255 pixel levels


def test_corrupt_images_are_dropped_with_their_labels_and_counted():
    good = encoded(torch.full((3, 32, 32), 100, dtype=torch.uint8))
    png = io.BytesIO()
    Image.new("RGB", (20, 30), (10, 200, 30)).save(png, format="PNG")
    png_t = torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8)
    corrupt = good[:40].clone()
    bad = BadImages()
    aug = batch_augment.BatchAugment(augment.resolve("none", {}), 16, MEAN, STD, CPU, bad)
    x, labels = aug([good, corrupt, png_t, good], torch.tensor([0, 1, 2, 3]))
    assert x.shape[0] == 3 and labels.tolist() == [0, 2, 3]  # PNG decoded by the CPU fallback
    assert bad.total == 1


def test_crop_box_respects_scale_and_ratio():
    gen = random.Random(0)
    for _ in range(200):
        top, left, h, w = batch_augment.crop_box(60, 80, (0.3, 0.6), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.25 <= h * w / 4800 <= 0.65  # rounding at this size
    assert batch_augment.crop_box(10, 100, (0.99, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)  # fallback: centre


def config(tiny_root, decode="gpu", use_gpu=True, **augment_overrides):
    return parse_config({
        "name": "dev", "data": {"root": tiny_root, "classes": 4, "train_per_class": 8, "val_per_class": 4},
        "recipes": {"r": {"epochs": 2, "batch_size": 8, "plain_last_epochs": 1,
                          "augment": {"preset": "light", "overrides": augment_overrides},
                          "optimizer": {"name": "sgd", "lr": 0.2}}},
        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32,
                     "resources": {"loader_workers": 1, "use_gpu": use_gpu, "decode": decode}}]})


def test_member_trains_with_batch_decoding(tiny_root):
    cfg = config(tiny_root)
    member = resolve_members(cfg)[0]
    assert decode_on_device(member, CPU)  # decode: gpu is honoured; the pipeline itself runs on any device
    seen = []
    _, state = train_member(member, open_member_data(cfg.data), device=CPU,
                            on_epoch_end=lambda s, m, *_: seen.append(dict(m)))
    assert state.epoch == 2 and all(math.isfinite(m["train_loss"]) for m in seen)
    assert seen[0]["bad_images"] == 0 and seen[0]["first_step_s"] > 0


def test_auto_decodes_on_the_gpu_only_when_training_on_one(tiny_root):
    auto = resolve_members(config(tiny_root, decode="auto"))[0]
    assert decode_on_device(auto, torch.device("cuda")) and not decode_on_device(auto, CPU)


@pytest.mark.parametrize("overrides, problem", [({"auto_augment": "randaugment"}, "auto_augment=randaugment"),
                                                ({"random_erasing": 0.2}, "random_erasing")])
def test_decode_gpu_refuses_per_image_augmentations(tiny_root, overrides, problem):
    with pytest.raises(UserError, match=f"decode: gpu cannot apply {problem}"):
        resolve_members(config(tiny_root, **overrides))
    auto = resolve_members(config(tiny_root, decode="auto", **overrides))[0]
    assert not decode_on_device(auto, torch.device("cuda"))  # auto falls back to the CPU pipeline


def test_decode_gpu_without_a_gpu_is_refused(tiny_root):
    with pytest.raises(UserError, match="decode: gpu needs use_gpu: true"):
        resolve_members(config(tiny_root, use_gpu=False))  # checked on the merged resources


def _jpeg(h: int, w: int, progressive: bool = False) -> torch.Tensor:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 90)).save(buf, format="JPEG", progressive=progressive, quality=70)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_jpeg_size_reads_the_header():
    for h, w, prog in ((64, 48, False), (3000, 4000, False), (333, 500, True)):
        assert batch_augment.jpeg_size(_jpeg(h, w, prog)) == (h, w)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert batch_augment.jpeg_size(torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8)) is None


def test_one_huge_image_does_not_size_the_batch(monkeypatch):
    """A 4000 x 3000 JPEG among small ones is decoded at reduced size (1000 x 750 here):
    no image on the device has a side over max_side, and the padded roi blocks are
    bounded by ROI_GROUP x 3 x max_side^2, not by the largest image."""
    f = augment.resolve("standard", {})
    aug = batch_augment.BatchAugment(f, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.device("cpu"))
    batch = [_jpeg(3000, 4000)] + [_jpeg(60 + k, 64) for k in range(5)]
    decoded = aug.decode(batch)
    assert aug.max_side == 512
    assert max(max(img.shape[-2:]) for img in decoded) <= aug.max_side
    assert tuple(decoded[0].shape) == (3, 384, 512)  # aspect kept
    assert [tuple(d.shape[-2:]) for d in decoded[1:]] == [(60 + k, 64) for k in range(5)]

    sizes = []
    real_zeros = torch.zeros

    def zeros(*shape, **kw):
        sizes.append(math.prod(shape))
        return real_zeros(*shape, **kw)

    monkeypatch.setattr(aug, "ROI_GROUP", 2)
    monkeypatch.setattr(batch_augment.torch, "zeros", zeros)
    # whole-image crops: their right and bottom edges meet the padding, which repeats the
    # image's edge, so a group's padding does not change an image's crop
    boxes = [(0, 0, d.shape[-2], d.shape[-1]) for d in decoded]
    grouped = aug._roi(decoded, boxes)
    assert len(sizes) == 3 and max(sizes) <= 2 * 3 * aug.max_side ** 2
    one = aug._roi_group(decoded, boxes)  # all at once: the same output, row by row
    assert torch.allclose(grouped, one, atol=1e-3)
    x, labels = aug(batch, torch.arange(6))
    assert tuple(x.shape) == (6, 3, 64, 64) and labels.tolist() == list(range(6))


def test_batch_colour_jitter_draws_as_torchvisions_colorjitter():
    """Jittered pixel statistics of one fixed image over 10,000 draws: the batch form and
    torchvision's ColorJitter (a random order of brightness, contrast and saturation per
    call) cannot be told apart by a two-sample test at the 1% level."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 8, 8, generator=gen)
    img[0, :4] = 0.95  # saturated reds next to dark pixels: clamping makes the order matter
    img[1:, :4] = 0.1
    n, s = 10_000, 0.4
    torch.manual_seed(1)
    jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s)
    theirs = torch.stack([jitter(img) for _ in range(n)])
    ours = batch_augment.BatchAugment(augment.resolve("none", {"color_jitter": s}), 8, (0, 0, 0), (1, 1, 1),
                                      CPU).color(img.expand(n, -1, -1, -1).clone())
    for stat in (lambda x: x[:, 0].mean(dim=(1, 2)), lambda x: x[:, 1:].mean(dim=(1, 2, 3)),
                 lambda x: x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))):
        assert ks_2samp(stat(ours).numpy(), stat(theirs).numpy()).pvalue > 0.01
