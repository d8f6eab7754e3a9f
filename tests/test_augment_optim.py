"""Augmentation presets from named fields; weight decay chosen by module type."""
import pytest
import torch
from torch import nn

from orchestrator.base.errors import UserError
from orchestrator.train import augment
from orchestrator.train.optim import build_optimizer, param_groups
from orchestrator.config import Optimizer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("preset", augment.list_presets())
def test_every_preset_builds_a_pipeline(preset):
    fields = augment.resolve(preset, {})
    tf = augment.build_train_transform(fields, 32, MEAN, STD)
    img = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8)
    out = tf(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_overrides_win_over_the_preset():
    f = augment.resolve("strong", {"mixup_alpha": 0.0, "crop_scale": [0.5, 1.0]})
    assert f.mixup_alpha == 0.0 and f.cutmix_alpha == 1.0 and f.crop_scale == (0.5, 1.0)


def test_unknown_preset_and_field_name_the_valid_choices():
    with pytest.raises(UserError, match="unknown augmentation preset 'hard'.*randaugment.*strong"):
        augment.resolve("hard", {})
    with pytest.raises(UserError, match="unknown augmentation field 'colour_jitter'.*color_jitter"):
        augment.resolve("standard", {"colour_jitter": 0.4})


def test_pca_lighting_shifts_colour_along_the_principal_components():
    torch.manual_seed(0)
    img = torch.full((3, 8, 8), 0.5)
    out = augment.PCALighting(0.1)(img)
    shift = (out - img)[:, 0, 0]
    assert shift.abs().sum() > 0
    assert torch.allclose(out - img, shift.view(3, 1, 1).expand(3, 8, 8))  # same shift at every pixel
    assert torch.equal(augment.PCALighting(0.0)(img), img)


def test_mixup_gives_soft_targets_that_sum_to_one():
    mix = augment.build_batch_mix(augment.resolve("standard", {"mixup_alpha": 0.4}), num_classes=5)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, soft = mix(images, labels)
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(1), torch.ones(4))
    assert augment.build_batch_mix(augment.resolve("standard", {}), 5) is None


def test_eval_transform_resizes_then_centre_crops():
    tf = augment.build_eval_transform(36, 32, MEAN, STD)
    assert tf(torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)).shape == (3, 32, 32)


def test_batch_normalisation_matches_the_per_image_eval_transform():
    # the recompute path: uint8 geometry per image, then normalisation per batch
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = [torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8) for _ in range(4)]
    per_image = torch.stack([augment.build_eval_transform(36, 32, mean, std)(img) for img in images])
    geometry = augment.EvalGeometry(36, 32)
    batch = augment.normalize_batch(torch.stack([geometry(img) for img in images]), mean, std)
    assert batch.dtype == torch.float32 and torch.allclose(batch, per_image, atol=1e-5)


def test_batched_eval_geometry_matches_image_by_image():
    geometry = augment.EvalGeometry(36, 32)
    same = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(3)]
    mixed = same + [torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)]
    for images in (same, mixed):
        assert torch.equal(geometry.batch(images), torch.stack([geometry(img) for img in images]))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.gn = nn.GroupNorm(2, 4)


def test_no_weight_decay_on_norm_layers_and_biases():
    net = Net()
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    expected = {net.conv.bias, net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias, net.fc.bias,
                net.gn.weight, net.gn.bias}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}


def test_sgd_nesterov_and_adamw():
    sgd = build_optimizer(Net(), Optimizer(name="sgd", nesterov=True), lr=0.2)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.2
    adamw = build_optimizer(Net(), Optimizer(name="adamw", weight_decay=0.05), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
