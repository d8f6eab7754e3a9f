"""The architecture registry: name -> keyword-only builder plus the spec evaluation needs.

Follows torchvision's `models/_api.py`: names map to builders, duplicates are refused,
and every entry carries its own eval transform (input size, resize, crop, mean/std) so an
Inception is evaluated at 299 px without anyone remembering. Each ImageNet entry also
has a low-resolution form (`low_res=True`) for 32-64 px inputs such as Tiny-ImageNet; the
CIFAR networks (`models/cifar.py`) are small-image networks by design, so their two forms
are the same network and their native size is 32 px.
Weights are never downloaded: every model is built with random initialisation.
"""
from __future__ import annotations

import io
import itertools
from dataclasses import asdict, dataclass, replace
from typing import Callable

import fsspec
import torch
import torchvision.models as tvm
from torch import nn

from models import cifar, lowres
from orchestrator.base.errors import UserError, unknown_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # Inception-v3/v4 and Inception-ResNet-v2 were trained on [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EvalTransform:
    """What evaluation needs to feed a member: resize the short side, centre-crop."""

    input_size: int
    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    low_res_fn: Callable[[nn.Module], nn.Module]
    eval: EvalTransform
    low_res_size: int = 64  # Tiny-ImageNet
    min_low_res_size: int = 32
    small: bool = False  # designed for 32 px images (models/cifar.py): both forms are the same net

    def eval_transform(self, low_res: bool, input_size: int | None = None) -> EvalTransform:
        """The eval transform for this model at its native or low-res size.

        Native resolution uses the standard 0.875 crop ratio (resize 256 -> crop 224);
        low-res inputs are already the network size, so no crop (crop_pct 1.0).
        """
        if not low_res and input_size is None:
            return self.eval
        size = input_size or self.low_res_size
        resize = size if low_res else round(size / 0.875)
        return replace(self.eval, input_size=size, resize=resize, crop=size)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("architecture", name, _REGISTRY) from None


def build_model(name: str, *, num_classes: int, low_res: bool = False) -> nn.Module:
    """Build an untrained model; `low_res` swaps the ImageNet stem for a 32-64 px one."""
    spec = get_spec(name)
    model = spec.builder(num_classes=num_classes)
    return spec.low_res_fn(model) if low_res else model


# --- checkpoints: a plain dict, readable from any fsspec URL -------------------------
def save_checkpoint(path: str, *, arch: str, num_classes: int, low_res: bool, model: nn.Module, **extra) -> None:
    state = {"arch": arch, "num_classes": num_classes, "low_res": low_res, "state_dict": model.state_dict(), **extra}
    with fsspec.open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(uri: str, *, expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint written by `save_checkpoint` (local or s3://)."""
    try:
        with fsspec.open(uri, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {uri}") from None
    if expect_arch is not None and state["arch"] != expect_arch:
        raise UserError(f"checkpoint {uri} holds a {state['arch']!r}, expected {expect_arch!r}")
    return _rebuild(state), state


def _rebuild(state: dict) -> nn.Module:
    """The model with the checkpoint's weights. It is built on the meta device first, so no
    time goes to a random initialisation that the weights replace (0.2 s for a ResNet-18,
    seconds for a VGG: once per member in every recompute); a model holding state that
    the checkpoint lacks (non-persistent buffers) is built normally instead."""
    kwargs = dict(num_classes=state["num_classes"], low_res=state["low_res"])
    with torch.device("meta"):
        model = build_model(state["arch"], **kwargs)
    model.load_state_dict(state["state_dict"], assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = build_model(state["arch"], **kwargs)
        model.load_state_dict(state["state_dict"])
    return model


# --- the zoo ---------------------------------------------------------------------------
def _tv(fn, **fixed):
    """A torchvision builder with random init (weights=None: nothing is downloaded)."""
    return lambda *, num_classes: fn(weights=None, num_classes=num_classes, **fixed)


def _timm(name):
    def build(*, num_classes):
        import timm  # imported on use: it adds ~2 s to every Ray worker's start-up

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


_STD = EvalTransform(224, 256, 224)
_INC = EvalTransform(299, 342, 299, INCEPTION_MEAN, INCEPTION_STD)

for _name in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
    register(ModelSpec(_name, "vgg", _tv(getattr(tvm, _name)), lowres.vgg, _STD))
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register(ModelSpec(_name, "resnet", _tv(getattr(tvm, _name)), lowres.resnet, _STD))
for _name in ("resnext50_32x4d", "resnext101_32x8d"):
    register(ModelSpec(_name, "resnext", _tv(getattr(tvm, _name)), lowres.resnet, _STD))
for _name in ("wide_resnet50_2", "wide_resnet101_2"):
    register(ModelSpec(_name, "wide_resnet", _tv(getattr(tvm, _name)), lowres.resnet, _STD))
for _name in ("densenet121", "densenet161", "densenet169", "densenet201"):
    register(ModelSpec(_name, "densenet", _tv(getattr(tvm, _name)), lowres.densenet, _STD))
register(ModelSpec("googlenet", "inception", _tv(tvm.googlenet, aux_logits=False, init_weights=True),
                   lowres.googlenet, _STD))
register(ModelSpec("inception_v3", "inception", _tv(tvm.inception_v3, aux_logits=False, init_weights=True),
                   lowres.inception_v3, _INC))
register(ModelSpec("inception_v4", "inception", _timm("inception_v4"), lowres.timm_inception, _INC,
                   min_low_res_size=64))
register(ModelSpec("inception_resnet_v2", "inception_resnet", _timm("inception_resnet_v2"),
                   lowres.timm_inception, _INC, min_low_res_size=64))

# Small-image networks (models/cifar.py): native at 32 px, evaluated on the whole image
# (no crop), and the same network in both forms.
_CIFAR = EvalTransform(32, 32, 32)
_SAME = lambda model: model  # noqa: E731


def _small(name: str, family: str, builder) -> None:
    register(ModelSpec(name, family, builder, _SAME, _CIFAR, low_res_size=32, min_low_res_size=16, small=True))


for _depth in (20, 32, 56):
    _small(f"resnet{_depth}", "resnet", cifar.resnet(_depth))
for _k in (2, 4, 8):
    _small(f"wrn16_{_k}", "wide_resnet", cifar.wide_resnet(16, _k))
_small("vgg8", "vgg", cifar.vgg8)
