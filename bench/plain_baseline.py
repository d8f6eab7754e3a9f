"""A plain PyTorch baseline for `bench/reproduce.py`: no platform code, only torch,
torchvision, numpy and the standard library, so its figure checks the platform's.

It reads the same shards (`tarfile` over the WebDataset `.tar.gz` files and their
`manifest.json`), keeps the same subset (the first C classes in the manifest's order,
the first P train and V val images of each class in shard order), and trains a ResNet-20
(He et al. 2016, CIFAR form, option-A shortcuts; written here) with AdamW, a one-cycle
LR (peak at a quarter), random-resized crops and flips, then prints one JSON line of its val top-1/top-5 error.

    python bench/plain_baseline.py --root ../shared/data/tiny-imagenet-200 --classes 50 \
        --train-per-class 100 --val-per-class 50 --epochs 8 --size 32
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

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_subset(root: str, split: str, classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, H, W] and labels: the first `per_class` images of each of the first classes."""
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    taken, images, labels = [0] * classes, [], []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(os.path.join(root, shard["file"]), "r|gz") as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                sample = pending[key]
                if "cls" in sample and ("jpg" in sample or "jpeg" in sample):
                    del pending[key]
                    y = int(sample["cls"])
                    if y < classes and taken[y] < per_class:
                        taken[y] += 1
                        img = Image.open(io.BytesIO(sample.get("jpg") or sample["jpeg"])).convert("RGB")
                        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                        labels.append(y)
    return torch.stack(images), torch.tensor(labels)


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


def one_cycle(t: float, peak_at: float = 0.25, start: float = 0.04, final: float = 1e-4) -> float:
    """LR factor at fraction t of training: linear up to the peak, then half a cosine down
    (Smith & Topin 2018; torch's OneCycleLR has no phase shorter than a step)."""
    if t < peak_at:
        return start + (1 - start) * t / peak_at
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (t - peak_at) / (1 - peak_at)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.008, help="AdamW peak LR per 256 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()
    x_train, y_train = read_subset(args.root, "train", args.classes, args.train_per_class)
    x_val, y_val = read_subset(args.root, "val", args.classes, args.val_per_class)
    train_tf = v2.Compose([v2.RandomResizedCrop(args.size, scale=(0.6, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    val_tf = v2.Compose([v2.Resize(args.size, antialias=True), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(MEAN, STD)])
    model = resnet20(args.classes).to(device)
    lr = args.lr * args.batch / 256
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = args.epochs * (len(x_train) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle(step / steps))
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for k in range(len(x_train) // args.batch):
            idx = order[k * args.batch:(k + 1) * args.batch]
            xb = torch.stack([train_tf(x_train[i]) for i in idx]).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.stack([val_tf(img) for img in x_val[i:i + 256]]).to(device)).cpu()
                            for i in range(0, len(x_val), 256)])
    top5 = logits.topk(5, dim=1).indices
    top1_err = (top5[:, 0] != y_val).float().mean().item()
    top5_err = 1 - (top5 == y_val[:, None]).any(dim=1).float().mean().item()
    print(json.dumps({"arch": "resnet20 (plain PyTorch)", "top1_err": top1_err, "top5_err": top5_err,
                      "train_images": len(x_train), "val_images": len(x_val), "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
