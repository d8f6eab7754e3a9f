"""A plain PyTorch baseline for `bench/reproduce.py`: no platform code, only torch,
torchvision, numpy and the standard library, so its figure checks the platform's.

It trains one network like for like with one platform member: the member's recipe and
image keys come in one JSON file (`--member`, written by `bench/reproduce.py`), so the
baseline trains on exactly the images that member trained on (its share of train, its
minival left out) with the same optimiser, LR per 256 images, batch, LR policy and
warm-up, crops, flips, label smoothing and epochs, and is scored on the same val images
with the same rule: a tie with the true class counts as a miss. It reads the shards
itself (`tarfile` over the WebDataset `.tar.gz` files and their `manifest.json`) and
writes its own networks (a CIFAR ResNet-20, He et al. 2016 with option-A shortcuts;
torchvision's ResNet-18/34 with the 3x3 stride-1 stem of small images). Prints one JSON
line of its val top-1/top-5 error.

    python bench/plain_baseline.py --root ../shared/data/tiny-imagenet-200 --member member.json

member.json: {"name", "arch", "low_res", "input_size", "seed", "classes": [original class
indices, in label order], "train_keys": [...], "val_keys": [...], "recipe": {"epochs",
"batch_size", "optimizer": {"name", "lr", "momentum", "nesterov", "weight_decay", "betas"},
"schedule": {"policy", "warmup_epochs", "params"}, "augment": {"crop_scale",
"crop_ratio", "hflip", "label_smoothing"}, "plain_last_epochs", "bf16"}, "eval": {"resize",
"crop", "mean", "std"}}. Anything else in a recipe has no plain counterpart here and is
refused by `bench/reproduce.py` before this runs.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

def read_keys(root: str, split: str, keys: list[str], classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, H, W] and labels (0..K-1 in the order of `classes`) of the samples
    named by `keys`, in that order."""
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    wanted, label_of = set(keys), {c: i for i, c in enumerate(classes)}
    found: dict[str, tuple[torch.Tensor, int]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(os.path.join(root, shard["file"]), "r|gz") as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                sample = pending[key]
                if "cls" in sample and ("jpg" in sample or "jpeg" in sample):
                    del pending[key]
                    if key in wanted:
                        img = Image.open(io.BytesIO(sample.get("jpg") or sample["jpeg"])).convert("RGB")
                        found[key] = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1),
                                      label_of[int(sample["cls"])])
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise SystemExit(f"{split}: {len(missing)} keys not in {root} (e.g. {sorted(missing)[0]})")
    return torch.stack([found[k][0] for k in keys]), torch.tensor([found[k][1] for k in keys])


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:  # option A: zero-padded channels, no parameters
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


def resnet20(num_classes: int) -> nn.Module:
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model


def torchvision_resnet(name: str, num_classes: int, low_res: bool) -> nn.Module:
    """torchvision's ResNet; for small images a 3x3 stride-1 stem and no max-pool (He et
    al. 2016, CIFAR section)."""
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if low_res:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build(arch: str, num_classes: int, low_res: bool) -> nn.Module:
    if arch == "resnet20":
        return resnet20(num_classes)
    if arch in ("resnet18", "resnet34"):
        return torchvision_resnet(arch, num_classes, low_res)
    raise SystemExit(f"plain baseline: no plain network {arch!r}; valid: resnet18, resnet20, resnet34")


def half_cosine(t: float, final: float) -> float:
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def policy(name: str, params: dict):
    """LR factor at fraction t of training (after warm-up): one-cycle (Smith & Topin 2018:
    linear up to the peak, then half a cosine down), cosine (Loshchilov & Hutter 2017),
    constant."""
    if name == "onecycle":
        peak, start, final = params.get("peak_at", 0.3), params.get("start", 0.04), params.get("final", 1e-4)
        return lambda t: start + (1 - start) * t / peak if t < peak else half_cosine((t - peak) / (1 - peak), final)
    if name == "cosine":
        return lambda t: half_cosine(t, params.get("final", 0.0))
    if name == "constant":
        return lambda t: 1.0
    raise SystemExit(f"plain baseline: no plain LR policy {name!r}; valid: constant, cosine, onecycle")


def lr_factor(schedule: dict, total: int, warmup: int):
    """step -> LR factor: linear warm-up to the policy's start over `warmup` steps, then the policy."""
    fn = policy(schedule["policy"], schedule.get("params") or {})
    span = max(total - warmup, 1)
    return lambda step: fn(0.0) * (step + 1) / warmup if step < warmup else fn(min((step - warmup) / span, 1.0))


def optimizer(model: nn.Module, opt: dict, lr: float) -> torch.optim.Optimizer:
    """No weight decay on normalisation layers and biases (Goyal et al. 2017)."""
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            norm = isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
            (plain if norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": plain, "weight_decay": 0.0}]
    if opt["name"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt["momentum"], nesterov=opt["nesterov"] and opt["momentum"] > 0)
    if opt["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt["betas"]))
    raise SystemExit(f"plain baseline: no plain optimiser {opt['name']!r}; valid: adamw, sgd")


def errors(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error, a tie with the true class counted as a miss: a hit at k iff
    fewer than k other classes have a probability >= the true class's."""
    true = probs.gather(1, labels.view(-1, 1))
    others = (probs >= true).sum(1) - 1
    return float((others >= 1).double().mean()), float((others >= 5).double().mean())


def train_transforms(size: int, aug: dict, ev: dict):
    """(the recipe's crop + flip pipeline, its plain form for the last epochs: whole-image
    crop, flip kept)."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(ev["mean"], ev["std"])]
    flip = [v2.RandomHorizontalFlip(aug["hflip"])] if aug["hflip"] > 0 else []

    def crop(scale, ratio):
        return v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)

    return (v2.Compose([crop(aug["crop_scale"], aug["crop_ratio"]), *flip, *tail]),
            v2.Compose([crop((1.0, 1.0), (1.0, 1.0)), *flip, *tail]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--member", required=True, help="the member's recipe and image keys (JSON; see above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    spec = json.load(open(args.member))
    recipe, ev = spec["recipe"], spec["eval"]
    device = torch.device(args.device)
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(args.threads)
    start = time.time()
    x_train, y_train = read_keys(args.root, "train", spec["train_keys"], spec["classes"])
    x_val, y_val = read_keys(args.root, "val", spec["val_keys"], spec["classes"])
    train_tf, plain_tf = train_transforms(spec["input_size"], recipe["augment"], ev)
    val_tf = v2.Compose([v2.Resize(ev["resize"], antialias=True), v2.CenterCrop(ev["crop"]),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(ev["mean"], ev["std"])])
    model = build(spec["arch"], len(spec["classes"]), spec["low_res"]).to(device)
    batch, epochs = recipe["batch_size"], recipe["epochs"]
    opt = optimizer(model, recipe["optimizer"], recipe["optimizer"]["lr"] * batch / 256)  # LR per 256 images
    per_epoch = max(len(x_train) // batch, 1)
    warmup = round(recipe["schedule"].get("warmup_epochs", 0.0) * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe["schedule"], epochs * per_epoch, warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["augment"]["label_smoothing"])
    bf16 = bool(recipe.get("bf16")) and device.type == "cuda"  # the platform's autocast is GPU-only
    for epoch in range(epochs):
        tf = plain_tf if epoch >= epochs - recipe["plain_last_epochs"] else train_tf
        model.train()
        order = torch.randperm(len(x_train))
        for k in range(per_epoch):
            idx = order[k * batch:(k + 1) * batch]
            xb = torch.stack([tf(x_train[i]) for i in idx]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # as the member trains on a GPU
                loss = loss_fn(model(xb), y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(torch.stack([val_tf(img) for img in x_val[i:i + 256]]).to(device)).float()
                           .softmax(1).cpu() for i in range(0, len(x_val), 256)])
    top1_err, top5_err = errors(probs, y_val)
    print(json.dumps({"arch": f"{spec['arch']} (plain PyTorch)", "member": spec["name"], "top1_err": top1_err,
                      "top5_err": top5_err, "train_images": len(x_train), "val_images": len(x_val),
                      "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
