"""Weights reach the embedder from an installed package, a local file (state dict or safetensors, torchvision
or timm) or a re-ID model file; nothing is downloaded, and the version names the weights' digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from serve_app.reid.backbones import ReIDNet, build_backbone, save_reid_model
from serve_app.reid.embedder import Embedder, ModelSpec
from serve_app.reid.model_spec import PACKAGED, file_sha256

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:timm.*")


def _crops() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(3)]


def test_packaged_imagenet_mobilenet_matches_the_digest_and_gives_features() -> None:
    packaged = PACKAGED["mobilenet_v2"]
    assert file_sha256(packaged.path()) == packaged.sha256
    embedder = Embedder(ModelSpec("mobilenet_v2", "imagenet", input_size_px=96))
    assert embedder.model_version == f"mobilenet_v2-{packaged.sha256[:12]}-96"
    assert embedder.embedding_dim == 1280
    vectors = embedder.embed_crops(_crops())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Pretrained features are not those of a random initialisation of the same architecture.
    random = Embedder(ModelSpec("mobilenet_v2", "random", input_size_px=96)).embed_crops(_crops())
    assert not np.allclose(vectors, random, atol=1e-2)


def test_imagenet_weights_are_refused_for_an_architecture_without_packaged_ones() -> None:
    with pytest.raises(ValueError, match="no packaged ImageNet weights for 'resnet50'"):
        Embedder(ModelSpec("resnet50", "imagenet", input_size_px=64))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_model_loads_from_a_local_file_and_its_version_carries_the_digest(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / f"field{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    embedder = Embedder(ModelSpec("timm:resnet18", str(path), input_size_px=64))
    assert embedder.model_version == f"timm:resnet18-{file_sha256(path)[:12]}-64"
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(embedder.preprocess(_crops())), dim=1).numpy()
    assert np.allclose(embedder.embed_crops(_crops()), expected, atol=1e-5)


def test_a_weights_file_missing_backbone_tensors_is_refused(tmp_path: Path) -> None:
    state = build_backbone("timm:resnet18").state_dict()
    partial = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in partial.items()}, str(path))
    with pytest.raises(ValueError, match=r"lack \d+ backbone tensors"):
        Embedder(ModelSpec("timm:resnet18", str(path), input_size_px=64))


def test_unknown_architectures_say_so() -> None:
    with pytest.raises(ValueError, match="unknown timm architecture"):
        build_backbone("timm:not_a_model")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("not_a_model")


def test_reid_model_file_round_trips_with_its_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = ReIDNet(build_backbone("resnet18"), 512, 64).eval()
    path = tmp_path / "reid.safetensors"
    digest = save_reid_model(net, path, architecture="resnet18", input_size_px=64, extra={"epochs": 1})
    assert digest == file_sha256(path)
    embedder = Embedder(ModelSpec("resnet18", str(path), input_size_px=64))
    assert embedder.embedding_dim == 64
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(embedder.preprocess(_crops())), dim=1).numpy()
    assert np.allclose(embedder.embed_crops(_crops()), expected, atol=1e-5)
    with pytest.raises(ValueError, match="trained on resnet18, not resnet34"):
        Embedder(ModelSpec("resnet34", str(path), input_size_px=64))
    with pytest.raises(ValueError, match="takes 64 px inputs, not 96"):
        Embedder(ModelSpec("resnet18", str(path), input_size_px=96))
