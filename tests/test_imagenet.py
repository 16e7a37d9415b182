"""ImageNet / ImageFolder DataModule: layout and labels, position-seeded crops independent of the
worker count, the random-resized-crop box, device-side flip and normalization, the cached index,
clear errors, and a CLI run of quantized ResNet-18 with BCGD."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torchvision.transforms.v2 as T
from torchvision.io import ImageReadMode, decode_image

from qlight.cli import main
from qlight.data import DatasetError, ImageNetDataModule, normalize, random_resized_crop_box

CONF = Path(__file__).parent / "conf"
MEAN = torch.tensor(ImageNetDataModule.mean)
STD = torch.tensor(ImageNetDataModule.std)


def _dm(root: Path, **kwargs: Any) -> ImageNetDataModule:
    options = {"num_classes": 3, "batch_size": 4, "num_workers": 0, "image_size": 16, "resize_size": 20}
    dm = ImageNetDataModule(str(root), **{**options, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_are_uint8_crops_with_folder_labels(imagenet_folder: Path) -> None:
    dm = _dm(imagenet_folder)
    assert dm.classes == ["n00000000", "n00000001", "n00000002"]
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    assert labels.dtype == torch.int64
    val = list(dm.val_dataloader())
    assert torch.cat([y for _, y in val]).tolist() == [0, 0, 1, 1, 2, 2]
    assert val[0][0].shape == (4, 3, 16, 16)
    # the class colour (channel c saturated) survives decoding, cropping and resizing
    for x, y in val:
        assert (x.float().mean(dim=(2, 3)).argmax(dim=1) == y).all()


def test_evaluation_is_resize_then_center_crop(imagenet_folder: Path) -> None:
    dm = _dm(imagenet_folder)
    path = imagenet_folder / dm.val_dataset.files[3]
    expected = T.Compose([T.Resize(20, antialias=True), T.CenterCrop(16)])(
        decode_image(str(path), ImageReadMode.RGB)
    )
    assert torch.equal(dm.val_dataset[3][0], expected)


def test_crops_are_a_function_of_seed_epoch_and_index(
    imagenet_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    dm = _dm(imagenet_folder)
    dm.train_dataset.seed = 5
    first = dm.train_dataset[(7, 0)][0]
    assert torch.equal(dm.train_dataset[(7, 0)][0], first)
    assert not torch.equal(dm.train_dataset[(7, 1)][0], first)

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dm.num_workers = workers
        return list(dm.train_dataloader())

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 6
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_random_resized_crop_box_stays_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(40, 60, g)
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w and h > 0 and w > 0
        assert 0.08 * 0.9 <= h * w / 2400 <= 1.0
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    # a 4x200 strip admits no box with aspect <= 4/3 and area >= 8%: the fallback is a centred crop
    # clamped to the largest allowed aspect ratio
    assert random_resized_crop_box(4, 200, torch.Generator().manual_seed(0)) == (0, 97, 4, 5)


def test_device_side_flip_and_normalize(imagenet_folder: Path) -> None:
    dm = _dm(imagenet_folder, channels_last=True)
    images, labels = next(iter(dm.train_dataloader()))
    progress = SimpleNamespace(current=SimpleNamespace(ready=3))
    dm.trainer = SimpleNamespace(  # type: ignore[assignment]
        training=True,
        current_epoch=1,
        global_rank=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert y is labels and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    plain, mirrored = normalize(images, MEAN, STD), normalize(images.flip(-1), MEAN, STD)
    flipped = [torch.equal(x[i], mirrored[i]) for i in range(4)]
    assert all(f or torch.equal(x[i], plain[i]) for i, f in enumerate(flipped))
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], x)  # same position, same flips
    dm.trainer.training = False
    torch.testing.assert_close(dm.on_after_batch_transfer((images, labels), 0)[0], plain)


def test_index_is_cached_and_rescanned_when_a_class_folder_changes(
    imagenet_folder: Path, tmp_path: Path, qlight_cache: Path
) -> None:
    root = shutil.copytree(imagenet_folder, tmp_path / "imagenet")
    _dm(root)
    (index,) = qlight_cache.glob("imagenet-index-*.pt")
    assert _dm(root).classes == ["n00000000", "n00000001", "n00000002"]
    assert list(qlight_cache.glob("imagenet-index-*.pt")) == [index]
    shutil.copy(root / "train/n00000001/train_1_0.JPEG", root / "train/n00000001/extra.JPEG")
    assert len(_dm(root).train_dataset) == 25
    assert len(list(qlight_cache.glob("imagenet-index-*.pt"))) == 2


def _break(root: Path, how: str) -> None:
    if how == "no_val":
        shutil.rmtree(root / "val")
    elif how == "class_mismatch":
        (root / "val" / "n00000002").rename(root / "val" / "n00000009")
    elif how == "empty_class":
        for f in (root / "train" / "n00000001").iterdir():
            f.unlink()


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("no_val", "val does not exist; expected"),
        ("class_mismatch", "different class folders (in one only: ['n00000002', 'n00000009'])"),
        ("empty_class", "n00000001 holds no images"),
    ],
)
def test_bad_layouts_fail_with_one_clear_error(
    imagenet_folder: Path, tmp_path: Path, how: str, match: str
) -> None:
    root = shutil.copytree(imagenet_folder, tmp_path / "imagenet")
    _break(root, how)
    with pytest.raises(DatasetError, match=re.escape(match)):
        _dm(root)


def test_missing_root_wrong_class_count_and_corrupt_images(imagenet_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere does not exist.*cannot be downloaded"):
        ImageNetDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="has 3 class folders but num_classes=1000"):
        _dm(imagenet_folder, num_classes=1000)
    with pytest.raises(ValueError, match="resize_size=8 is smaller than image_size=16"):
        _dm(imagenet_folder, resize_size=8)
    root = shutil.copytree(imagenet_folder, tmp_path / "imagenet")
    (root / "val" / "n00000000" / "val_0_0.JPEG").write_bytes(b"not a jpeg")
    dm = _dm(root)
    with pytest.raises(DatasetError, match="cannot decode image .*val_0_0.JPEG"):
        list(dm.val_dataloader())


@pytest.mark.usefixtures("one_thread")
def test_cli_fits_quantized_resnet18_with_bcgd(
    imagenet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(CONF / "imagenet_resnet18_tiny.yaml"), "--data.root", str(imagenet_folder)]
    )
    metrics = cli.trainer.callback_metrics
    assert {"val/acc1", "val/acc3", "train/acc1", "bcgd/rho"} <= metrics.keys()
    assert cli.trainer.global_step == 6
    (csv,) = tmp_path.glob("logs/imagenet-resnet18-w1a4/bcgd-resnet18-w1a4-s0/version_0/metrics.csv")
    assert "bcgd/rho" in csv.read_text().splitlines()[0]
