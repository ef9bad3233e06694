"""Victim architectures and verified checkpoints."""

from __future__ import annotations

import pytest
import torch

from medsec.errors import MedsecError
from medsec.models import create_model, list_models, load_checkpoint, save_checkpoint

# Every architecture at every channel count; every size on the light ones (a 224 px
# ResNet-18 adds nothing the 28/64 px ones do not cover, at seconds of CPU time).
CASES = [
    (a, c, s) for a in ("small-cnn", "resnet-mini") for c in (1, 3) for s in (28, 64, 128, 224)
]
CASES += [("resnet18", c, s) for c in (1, 3) for s in (28, 64)]


@pytest.mark.parametrize("arch,channels,size", CASES)
def test_architectures_all_sizes(arch, channels, size):
    m = create_model(arch, in_channels=channels, num_classes=3, image_size=size).eval()
    x = torch.rand(2, channels, size, size)
    logits, feats = m.forward_features(x)
    assert logits.shape == (2, 3)
    assert torch.allclose(m(x), logits, atol=1e-5)
    assert feats["penultimate"].shape == (2, 128)
    assert list(feats) == list(m.feature_names)


def test_wrong_input_shape_is_clear():
    m = create_model("small-cnn", in_channels=1, num_classes=2, image_size=28)
    with pytest.raises(MedsecError, match="expects"):
        m(torch.rand(2, 3, 28, 28))
    with pytest.raises(MedsecError, match="unknown model"):
        create_model("vgg", in_channels=1, num_classes=2, image_size=28)
    assert "small-cnn" in list_models()


def test_checkpoint_roundtrip_and_tamper(tmp_path):
    m = create_model("small-cnn", in_channels=1, num_classes=2, image_size=28).eval()
    path = tmp_path / "m.pt"
    digest = save_checkpoint(
        path,
        m,
        arch="small-cnn",
        data_hash="abc",
        image_size=28,
        metrics={"clean_accuracy": 0.5},
        settings={},
    )
    m2, meta = load_checkpoint(path, expect_data_hash="abc")
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(m(x), m2(x))
    assert meta["sha256"] == digest and meta["metrics"]["clean_accuracy"] == 0.5
    with pytest.raises(MedsecError, match="other data"):
        load_checkpoint(path, expect_data_hash="def")
    blob = torch.load(path, weights_only=True)
    state = bytearray(blob["state"])
    state[len(state) // 2] ^= 0xFF
    blob["state"] = bytes(state)
    torch.save(blob, path)
    with pytest.raises(MedsecError, match="SHA-256"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(MedsecError, match="not a readable"):
        load_checkpoint(path)
    with pytest.raises(MedsecError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
