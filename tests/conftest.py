"""Shared fixtures: tiny fake CIFAR data in every layout qlight reads, and an isolated data cache.

Data fixtures are session-scoped and must be treated as read-only; tests that break data on
purpose copy it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fakedata import FakeCifar, make_fake_cifar, write_image_folder, write_pickled, write_zip

SHARED_CIFAR10_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


@pytest.fixture(autouse=True)
def qlight_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``$QLIGHT_CACHE`` at a fresh folder, so no test reads or writes ``~/.cache/qlight``."""
    path = tmp_path_factory.mktemp("qlight-cache")
    monkeypatch.setenv("QLIGHT_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests behave the same when pytest itself runs inside a SLURM job (run folders, W&B ids)."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "QLIGHT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscription on shared 2-core CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fake_cifar10() -> FakeCifar:
    """The images and labels behind every CIFAR-10 fixture: 10 classes x (8 train + 4 test)."""
    return make_fake_cifar(10, train_per_class=8, test_per_class=4)


@pytest.fixture(scope="session")
def fake_cifar100() -> FakeCifar:
    """The images and labels behind every CIFAR-100 fixture: 100 classes x (2 train + 1 test)."""
    return make_fake_cifar(100, train_per_class=2, test_per_class=1, seed=1)


@pytest.fixture(scope="session")
def cifar10_pickle(tmp_path_factory: pytest.TempPathFactory, fake_cifar10: FakeCifar) -> Path:
    """A root holding torchvision's ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta)."""
    return write_pickled(tmp_path_factory.mktemp("cifar10-pickle"), fake_cifar10)


@pytest.fixture(scope="session")
def cifar100_pickle(tmp_path_factory: pytest.TempPathFactory, fake_cifar100: FakeCifar) -> Path:
    """A root holding torchvision's ``cifar-100-python`` (train, test, meta)."""
    return write_pickled(tmp_path_factory.mktemp("cifar100-pickle"), fake_cifar100)


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory: pytest.TempPathFactory, fake_cifar10: FakeCifar) -> Path:
    """A PNG image-folder root: ``root/{train,test}/<class>/NNNN.png`` (lossless: same pixels as the pickles)."""
    return write_image_folder(tmp_path_factory.mktemp("cifar10-folder"), fake_cifar10)


@pytest.fixture(scope="session")
def cifar10_folder_jpg(tmp_path_factory: pytest.TempPathFactory, fake_cifar10: FakeCifar) -> Path:
    """A JPEG image-folder root with one extra top-level folder: ``root/cifar10/{train,test}/<class>/NNNN.jpg``."""
    return write_image_folder(
        tmp_path_factory.mktemp("cifar10-folder-jpg"), fake_cifar10, ext="jpg", top="cifar10"
    )


@pytest.fixture(scope="session")
def cifar10_zip(tmp_path_factory: pytest.TempPathFactory, fake_cifar10: FakeCifar) -> Path:
    """A ``.zip`` laid out like the shared real one, but with PNGs: ``cifar10/{train,test}/<class>/NNNN.png``."""
    tree = write_image_folder(tmp_path_factory.mktemp("cifar10-zip-tree"), fake_cifar10, top="cifar10")
    return write_zip(tree, tmp_path_factory.mktemp("cifar10-zip") / "cifar10.zip")


@pytest.fixture(scope="session")
def cifar100_folder(tmp_path_factory: pytest.TempPathFactory, fake_cifar100: FakeCifar) -> Path:
    """A PNG image-folder root with 100 classes: ``root/{train,test}/classNNN/NNNN.png``."""
    return write_image_folder(tmp_path_factory.mktemp("cifar100-folder"), fake_cifar100)


@pytest.fixture(scope="session")
def shared_cifar10_zip() -> Path:
    """The real CIFAR-10 JPEG zip beside the repository (``../shared/data``); skips when absent."""
    if not SHARED_CIFAR10_ZIP.is_file():
        pytest.skip(f"real CIFAR-10 zip not found at {SHARED_CIFAR10_ZIP} (see ../shared/data/README.md)")
    return SHARED_CIFAR10_ZIP


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageNet layout: ``root/{train,val}/n0000000{0,1,2}/*.JPEG`` (plus one PNG), images of
    varied sizes and aspect ratios; 8 training and 2 validation images per class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for c in range(3):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in torch.randint(24, 56, (2,), generator=g))
                pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
                pixels[..., c] = 255  # a class-dependent colour, so a tiny model can learn something
                ext = "png" if (split, c, i) == ("train", 0, 0) else "JPEG"
                Image.fromarray(pixels.numpy()).save(folder / f"{split}_{c}_{i}.{ext}")
    return root
