"""The model registry: every architecture trains at low resolution and carries its eval spec."""
import pytest
import torch

from models import build_model, get_spec, list_models, load_checkpoint, save_checkpoint
from orchestrator.base.errors import UserError

FAMILIES = {"vgg", "resnet", "resnext", "wide_resnet", "densenet", "inception", "inception_resnet"}


def test_registry_covers_the_ilsvrc_families():
    names = list_models()
    assert len(names) >= 20
    assert {get_spec(n).family for n in names} == FAMILIES
    for required in ("vgg16_bn", "googlenet", "inception_v3", "inception_v4", "inception_resnet_v2", "resnet18",
                     "resnet152", "resnext50_32x4d", "wide_resnet50_2", "densenet121"):
        assert required in names


@pytest.mark.parametrize("name", list_models())
def test_low_res_forward_backward(name):
    spec = get_spec(name)
    model = build_model(name, num_classes=7, low_res=True)
    size = spec.min_low_res_size
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", [n for n in list_models() if not get_spec(n).small])
def test_eval_transform_of_every_entry(name):
    spec = get_spec(name)
    native = spec.eval_transform(low_res=False)
    assert native.crop == native.input_size and native.resize > native.crop  # 0.875 centre crop
    assert native.input_size == (299 if name in ("inception_v3", "inception_v4", "inception_resnet_v2") else 224)
    low = spec.eval_transform(low_res=True, input_size=64)
    assert (low.input_size, low.resize, low.crop) == (64, 64, 64)


def test_inception_v3_native_resolution_forward():
    model = build_model("inception_v3", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 299, 299)).shape == (1, 5)


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(UserError) as err:
        build_model("resnet19", num_classes=10)
    assert "resnet19" in str(err.value) and "resnet18" in str(err.value) and "densenet121" in str(err.value)


def test_checkpoint_round_trip_and_wrong_arch(tmp_path):
    model = build_model("resnet18", num_classes=4, low_res=True)
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, arch="resnet18", num_classes=4, low_res=True, model=model, epoch=3)
    loaded, state = load_checkpoint(path, expect_arch="resnet18")
    assert state["epoch"] == 3
    x = torch.randn(1, 3, 32, 32)
    model.eval(), loaded.eval()
    assert torch.allclose(model(x), loaded(x))
    with pytest.raises(UserError, match="holds a 'resnet18', expected 'vgg11_bn'"):
        load_checkpoint(path, expect_arch="vgg11_bn")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("name", list_models())
def test_every_entry_reloads_from_its_checkpoint(name, tmp_path):
    """Loading builds on the meta device and takes the checkpoint's tensors: the reloaded
    model must compute what the saved one did, hold no meta tensor, and train again."""
    spec = get_spec(name)
    model = build_model(name, num_classes=3, low_res=True).eval()
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, arch=name, num_classes=3, low_res=True, model=model)
    loaded, _ = load_checkpoint(path, expect_arch=name)
    loaded.eval()
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert not any(t.is_meta for t in tensors)
    x = torch.randn(2, 3, spec.min_low_res_size, spec.min_low_res_size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert all(p.requires_grad for p in loaded.parameters())
    loaded.train()(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_a_model_with_state_outside_its_checkpoint_is_built_normally(monkeypatch):
    """A non-persistent buffer is not in the checkpoint; built on meta it would stay empty."""
    from torch import nn

    from models import registry

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    monkeypatch.setattr(registry, "build_model", lambda name, **kw: WithTable())
    saved = WithTable()
    model = registry._rebuild({"arch": "t", "num_classes": 2, "low_res": False, "state_dict": saved.state_dict()})
    assert torch.equal(model.table, torch.arange(4.0)) and torch.equal(model.fc.weight, saved.fc.weight)


# He et al. 2016 (Table 6) and Zagoruyko & Komodakis 2016 (Table 1 / code) parameter
# counts, with a 10-class head as in the papers
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "wrn16_4": 2.7e6, "wrn16_8": 11.0e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_cifar_networks_have_their_papers_size(name):
    model = build_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, count


@pytest.mark.parametrize("name", [n for n in list_models() if get_spec(n).small])
def test_small_networks_are_native_at_32_px_and_the_same_in_both_forms(name):
    spec = get_spec(name)
    assert spec.eval_transform(low_res=False) == spec.eval_transform(low_res=True) == spec.eval
    assert (spec.eval.input_size, spec.eval.resize, spec.eval.crop) == (32, 32, 32)  # the whole image, no crop
    torch.manual_seed(0)
    a = build_model(name, num_classes=5, low_res=False)
    torch.manual_seed(0)
    b = build_model(name, num_classes=5, low_res=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():  # global pooling: any input size from 16 px
        assert a.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_a_config_of_small_members_resolves_to_32_px_low_res():
    from orchestrator.config import load_config, resolve_members

    members = resolve_members(load_config("configs/default.yaml"))
    assert {get_spec(m.arch).small for m in members} == {True}
    assert {(m.input_size, m.low_res) for m in members} == {(32, True)}


def test_resnet_option_a_shortcut_pads_channels_without_parameters():
    from models.cifar import _Basic

    block = _Basic(16, 32, stride=2)
    x = torch.randn(1, 16, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (1, 32, 4, 4)
    assert torch.equal(short[:, :16], x[:, :, ::2, ::2]) and not short[:, 16:].any()
