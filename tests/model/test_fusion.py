"""Specification of the fusion network: shapes, determinism, pretrained weights, conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.models import resnet18

from model.fusion import FEATURES, FusionNet, convert_weights


class _Thing:
    """Stands for any class a pickle could name."""


def _inputs(n: int = 2, channels: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (n, channels, size, size)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


def test_fusion_and_tumor_only_shapes() -> None:
    tumor, loat = _inputs(3)
    fusion = FusionNet("fusion").eval()
    alone = FusionNet("tumor-only").eval()
    assert fusion(tumor, loat).shape == (3,)
    assert alone(tumor).shape == (3,)
    assert alone(tumor, loat).shape == (3,)  # the LOAT is ignored
    assert fusion.features(tumor, loat).shape == (3, 2 * FEATURES)
    assert alone.features(tumor).shape == (3, FEATURES)
    assert fusion.head.in_features == 1024 and alone.head.in_features == 512
    assert fusion.state_dict()["tumor.conv1.weight"].shape[1] == 6
    assert alone.loat is None
    assert not any(k.startswith("loat.") for k in alone.state_dict())
    with pytest.raises(ValueError, match="LOAT"):
        fusion(tumor)


def test_same_seed_same_network_and_output() -> None:
    tumor, loat = _inputs()
    torch.manual_seed(4)
    first = FusionNet("fusion", in_channels=6).eval()
    torch.manual_seed(4)
    second = FusionNet("fusion", in_channels=6).eval()
    torch.manual_seed(5)
    other = FusionNet("fusion", in_channels=6).eval()
    with torch.inference_mode():
        assert torch.equal(first(tumor, loat), second(tumor, loat))
        assert not torch.equal(first(tumor, loat), other(tumor, loat))
    assert FusionNet("fusion", in_channels=3, dropout=0.1).spec() == {
        "backbone": "resnet18",
        "arch": "fusion",
        "in_channels": 3,
        "dropout": 0.1,
        "features": FEATURES,
        "layout": "region",
    }


def test_the_phase_layout_gives_each_phase_its_tumour_and_fat_slices() -> None:
    # Channels are phase-major: 0-2 arterial slices, 3-5 portal-venous slices.
    torch.manual_seed(0)
    net = FusionNet("fusion", in_channels=6, layout="phase").eval()
    assert {b.conv1.in_channels for b in net.branches()} == {6}  # 3 tumour + 3 LOAT slices
    assert net.tumor is None and net.loat is None and len(net.branches()) == 2
    tumor = torch.rand(2, 6, 32, 32)
    loat = torch.rand(2, 6, 32, 32)
    changed = loat.clone()
    changed[:, 3:] += 1.0  # the portal-venous fat only
    with torch.inference_mode():
        arterial = net.arterial(torch.cat([tumor[:, :3], loat[:, :3]], dim=1))
        assert torch.equal(net.features(tumor, loat)[:, :512], arterial)
        assert torch.equal(net.features(tumor, changed)[:, :512], arterial)
        assert not torch.equal(
            net.features(tumor, changed)[:, 512:], net.features(tumor, loat)[:, 512:]
        )
    # Its tumour-only comparator keeps both phase branches, with the tumour slices alone.
    alone = FusionNet("tumor-only", in_channels=6, layout="phase")
    assert [b.conv1.in_channels for b in alone.branches()] == [3, 3]
    assert alone.spec()["layout"] == "phase" and not alone.uses_loat
    with pytest.raises(ValueError, match="two phases"):
        FusionNet(in_channels=3, layout="phase", phases=1)


def test_the_tiled_phase_layout_puts_tumour_and_fat_side_by_side() -> None:
    torch.manual_seed(0)
    net = FusionNet("fusion", in_channels=6, layout="phase-tiled").eval()
    assert [b.conv1.in_channels for b in net.branches()] == [3, 3]  # slices of one phase
    tumor, loat = torch.rand(2, 6, 32, 32), torch.rand(2, 6, 32, 32)
    with torch.inference_mode():
        tiled = torch.cat([tumor[:, :3], loat[:, :3]], dim=3)  # 32 × 64: tumour left, fat right
        assert torch.equal(net.features(tumor, loat)[:, :512], net.arterial(tiled))
        changed = loat.clone()
        changed[:, :3] += 1.0  # the arterial fat only
        assert not torch.equal(net.features(tumor, changed)[:, :512], net.arterial(tiled))
        assert torch.equal(
            net.features(tumor, changed)[:, 512:], net.features(tumor, loat)[:, 512:]
        )
    assert net.spec()["layout"] == "phase-tiled" and net.spec()["phases"] == 2
    # Its tumour-only comparator is the phase layout's: the tumour crop alone per phase.
    alone = FusionNet("tumor-only", in_channels=6, layout="phase-tiled")
    assert [b.conv1.in_channels for b in alone.branches()] == [3, 3]
    with pytest.raises(ValueError, match="two phases"):
        FusionNet(in_channels=3, layout="phase-tiled", phases=1)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="arch"):
        FusionNet("radiomics")
    with pytest.raises(ValueError, match="in_channels"):
        FusionNet(in_channels=0)
    with pytest.raises(ValueError, match="dropout"):
        FusionNet(dropout=1.0)
    with pytest.raises(ValueError, match="layout"):
        FusionNet(layout="channels")


def test_convert_weights_round_trip_and_pretrained_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = resnet18(weights=None)
    pth = tmp_path / "resnet18.pth"
    # The test may pickle (it plays the user with a torchvision file); the project never loads one.
    torch.save({"state_dict": reference.state_dict()}, pth)
    out = tmp_path / "resnet18.safetensors"
    count = convert_weights(pth, out)
    converted = load_file(str(out))
    assert count == len(converted) == len(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert torch.equal(converted[key], tensor)

    net = FusionNet("fusion", in_channels=6)
    assert net.load_pretrained(out) == []
    state = net.state_dict()
    for branch in ("tumor", "loat"):
        layer = state[f"{branch}.layer1.0.conv1.weight"]
        assert torch.equal(layer, reference.state_dict()["layer1.0.conv1.weight"])
        conv1 = state[f"{branch}.conv1.weight"]
        assert conv1.shape == (64, 6, 7, 7)
        expected = reference.conv1.weight.mean(dim=1, keepdim=True) * 0.5  # 3 / 6
        assert torch.allclose(conv1[:, :1], expected)
        assert torch.allclose(conv1[:, 5:], expected)
    # The phase layout's branches take 6 channels of their own; tumour-only phase branches 3.
    phase = FusionNet("tumor-only", in_channels=6, layout="phase")
    assert phase.load_pretrained(out) == []
    conv1 = phase.state_dict()["arterial.conv1.weight"]
    assert torch.allclose(
        conv1, reference.conv1.weight.mean(dim=1, keepdim=True).repeat(1, 3, 1, 1)
    )


def test_convert_weights_refuses_what_is_not_a_state_dict(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError):
        convert_weights(junk, tmp_path / "out.safetensors")
    # A pickle of an arbitrary object: the weights-only unpickler refuses it, nothing runs.
    hostile = tmp_path / "hostile.pth"
    torch.save({"weights": torch.zeros(2), "thing": _Thing()}, hostile)
    with pytest.raises(ValueError, match=r"not a plain state dict|weights-only"):
        convert_weights(hostile, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ValueError, match="no tensors"):
        convert_weights(empty, tmp_path / "out.safetensors")


def test_load_pretrained_refuses_other_networks(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="ResNet18"):
        FusionNet().load_pretrained(path)


def test_the_size_head_shares_the_branches_and_stays_out_of_a_plain_network() -> None:
    torch.manual_seed(0)
    for layout in ("region", "phase"):
        net = FusionNet("fusion", in_channels=6, layout=layout, size_head=True).eval()
        tumor, loat = torch.rand(3, 6, 32, 32), torch.rand(3, 6, 32, 32)
        logits, size = net.forward_with_size(tumor, loat)
        assert logits.shape == size.shape == (3,)
        assert torch.allclose(logits, net(tumor, loat))  # the classifier's logit is unchanged
        # The size loss alone trains the shared branches, not only its own head.
        net.zero_grad()
        size.pow(2).sum().backward()
        stem = net.branches()[0].conv1.weight.grad
        assert stem is not None and float(stem.abs().sum()) > 0
        assert net.head.weight.grad is None or float(net.head.weight.grad.abs().sum()) == 0
    plain = FusionNet("fusion", in_channels=6)
    assert not any(k.startswith("size_head.") for k in plain.state_dict())
    with pytest.raises(ValueError, match="no size head"):
        plain.forward_with_size(torch.rand(2, 6, 32, 32), torch.rand(2, 6, 32, 32))
