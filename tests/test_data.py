"""CIFAR DataModules: the three source layouts, the cache, device-side augmentation, splits, DDP and errors."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fakedata import FakeCifar, write_zip
from helpers import CloseProcessGroup
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

import qlight.data.sources
from qlight.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    DatasetError,
    TensorBatchDataset,
    normalize,
    random_crop_flip,
)

MEAN10 = torch.tensor(CIFAR10DataModule.mean)
STD10 = torch.tensor(CIFAR10DataModule.std)


def _setup(dm: CIFARDataModule) -> CIFARDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("layout", ["cifar10_pickle", "cifar10_folder", "cifar10_zip"])
def test_lossless_layouts_give_the_fake_pixels(
    layout: str, fake_cifar10: FakeCifar, request: pytest.FixtureRequest
) -> None:
    dm = _setup(CIFAR10DataModule(str(request.getfixturevalue(layout)), val_split=0.0))
    assert dm.classes == fake_cifar10.classes
    assert dm.num_classes == 10
    folder_order = layout != "cifar10_pickle"
    for split, dataset in (("train", dm.train_dataset), ("test", dm.test_dataset)):
        images, labels = fake_cifar10.split(split, folder_order=folder_order)
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (len(images), 3, 32, 32)
        assert dataset.images.is_contiguous()
        assert dataset.labels.dtype == torch.int64
        assert torch.equal(dataset.labels, labels)
        assert torch.equal(dataset.images, images)
    assert dm.val_dataset is dm.test_dataset  # val_split=0: validate on the test set, as the papers do


def test_jpeg_folder_with_extra_top_level_folder(cifar10_folder_jpg: Path, fake_cifar10: FakeCifar) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_folder_jpg)))
    images, labels = fake_cifar10.split("train", folder_order=True)
    assert torch.equal(dm.train_dataset.labels, labels)
    colours = dm.train_dataset.images.float().mean((2, 3))
    torch.testing.assert_close(colours, images.float().mean((2, 3)), atol=3, rtol=0)  # JPEG: close, not exact


@pytest.mark.parametrize("layout", ["cifar100_pickle", "cifar100_folder"])
def test_cifar100(layout: str, fake_cifar100: FakeCifar, request: pytest.FixtureRequest) -> None:
    dm = _setup(CIFAR100DataModule(str(request.getfixturevalue(layout)), batch_size=50))
    assert dm.num_classes == 100 and dm.classes == fake_cifar100.classes
    images, labels = fake_cifar100.split("train", folder_order=layout == "cifar100_folder")
    assert torch.equal(dm.train_dataset.images, images)
    assert torch.equal(dm.train_dataset.labels, labels)
    assert len(dm.test_dataset) == 100
    assert CIFAR100DataModule.mean != CIFAR10DataModule.mean


def test_pickle_root_may_be_the_batches_folder(cifar10_pickle: Path, fake_cifar10: FakeCifar) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_pickle / "cifar-10-batches-py")))
    assert torch.equal(dm.test_dataset.images, fake_cifar10.test_images)


def test_subset_is_class_balanced(cifar10_zip: Path, fake_cifar10: FakeCifar) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_zip), batch_size=4, subset=25, test_subset=10))
    assert torch.bincount(dm.train_dataset.labels).tolist() == [3] * 5 + [2] * 5
    assert torch.bincount(dm.test_dataset.labels).tolist() == [1] * 10
    images, labels = fake_cifar10.split("train", folder_order=True)
    first_of_class = torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1
    assert torch.equal(dm.train_dataset.images[3], images[first_of_class[0]])  # the earliest images are kept


def test_parallel_decoding(
    cifar10_zip: Path, fake_cifar10: FakeCifar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large sources are decoded by forked workers (forced here on tiny data); errors still name the file."""
    monkeypatch.setattr(qlight.data.sources, "IMAGES_PER_WORKER", 8)
    monkeypatch.setattr(qlight.data.sources, "_cpu_count", lambda: 3)
    dm = _setup(CIFAR10DataModule(str(cifar10_zip)))
    assert torch.equal(dm.train_dataset.images, fake_cifar10.split("train", folder_order=True)[0])
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(cifar10_zip) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"broken" if name.endswith("truck/0007.png") else source.read(name))
    with pytest.raises(DatasetError, match=f"cannot read image cifar10/train/truck/0007.png in zip {path}"):
        _setup(CIFAR10DataModule(str(path)))


# ---------------------------------------------------------------------------------------------- cache


def test_second_setup_reads_the_cache(
    cifar10_folder: Path, qlight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _setup(CIFAR10DataModule(str(cifar10_folder)))
    files = _cache_files(qlight_cache)
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(qlight.data.sources, "decode", fail)
    second = _setup(CIFAR10DataModule(str(cifar10_folder)))
    assert torch.equal(first.train_dataset.images, second.train_dataset.images)
    assert _cache_files(qlight_cache) == files


def test_cache_follows_the_source(cifar10_folder: Path, qlight_cache: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(cifar10_folder, tmp_path / "data"))
    _setup(CIFAR10DataModule(str(root)))
    image = root / "train" / "cat" / "0000.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    dm = _setup(CIFAR10DataModule(str(root)))
    assert len(_cache_files(qlight_cache)) == 2
    assert (dm.train_dataset.images[dm.train_dataset.labels == 3][0, 0] == 255).all()


def test_cache_dir_argument(cifar10_pickle: Path, tmp_path: Path, qlight_cache: Path) -> None:
    _setup(CIFAR10DataModule(str(cifar10_pickle), cache_dir=str(tmp_path / "elsewhere")))
    assert len(_cache_files(tmp_path / "elsewhere")) == 1
    assert _cache_files(qlight_cache) == []


# ---------------------------------------------------------------------------------------------- loaders


def test_loaders(cifar10_folder: Path) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_folder), batch_size=16, eval_batch_size=12))
    train = list(dm.train_dataloader())
    assert len(train) == 80 // 16
    for images, labels in train:
        assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.shape == (16,)
    val = list(dm.val_dataloader())
    assert [len(labels) for _, labels in val] == [12, 12, 12, 4]  # every sample, in order
    assert torch.equal(torch.cat([labels for _, labels in val]), dm.test_dataset.labels)
    predict = torch.cat([images for images, _ in dm.predict_dataloader()])
    assert torch.equal(predict, dm.test_dataset.images)


def test_loader_with_worker_processes(cifar10_pickle: Path) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_pickle), batch_size=10, num_workers=2))
    dm.train_dataset = TensorBatchDataset(dm.train_dataset.images, torch.arange(80))
    loader = dm.train_dataloader()
    for _ in range(2):  # persistent workers serve a second epoch
        ids = torch.cat([ids for _, ids in loader])
        assert sorted(ids.tolist()) == list(range(80))


def test_training_set_smaller_than_a_batch(cifar10_folder: Path) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_folder), batch_size=128))
    with pytest.raises(DatasetError, match="fewer than one batch of 128"):
        dm.train_dataloader()


def test_batch_dataset_matches_tensor_dataset_collate() -> None:
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    dataset = TensorBatchDataset(images, torch.arange(20))
    torch.manual_seed(0)
    ours = list(DataLoader(dataset, batch_size=6, shuffle=True, collate_fn=qlight.data.cifar.collate_batch))
    torch.manual_seed(0)
    plain = list(
        DataLoader(torch.utils.data.TensorDataset(images, torch.arange(20)), batch_size=6, shuffle=True)
    )
    for (a, b), (c, d) in zip(ours, plain, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


# ---------------------------------------------------------------------------------------------- augmentation


def _match_windows(out: Tensor, images: Tensor, padding: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """For each output image, the (top, left, flipped) window of the zero-padded input it equals."""
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    n, _, h, w = images.shape
    found = torch.zeros(n, dtype=torch.int64)
    top, left, flipped = torch.full((n,), -1), torch.full((n,), -1), torch.zeros(n, dtype=torch.bool)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[:, :, dy : dy + h, dx : dx + w]
            for flip in (False, True):
                candidate = window.flip(-1) if flip else window
                hit = (out == candidate).flatten(1).all(1)
                found += hit
                top[hit], left[hit], flipped[hit] = dy, dx, flip
    assert (found == 1).all(), "an output is not exactly one shifted (and maybe mirrored) window of the input"
    return top, left, flipped


def test_random_crop_flip_takes_padded_windows() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.is_contiguous()
    top, left, flipped = _match_windows(out, images)
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9))
    assert 0.4 < flipped.float().mean() < 0.6  # 1/2 +- 4 sigma
    assert not _match_windows(random_crop_flip(images[:50], flip=False), images[:50])[2].any()


def test_random_crop_flip_follows_the_global_seed() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    a = random_crop_flip(images)
    torch.manual_seed(1)
    assert torch.equal(a, random_crop_flip(images))


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_closed_form(channels_last: bool) -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = normalize(images, MEAN10, STD10, channels_last=channels_last)
    expected = (images.float() / 255 - MEAN10.view(1, 3, 1, 1)) / STD10.view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def _unnormalize(x: Tensor, dm: CIFAR10DataModule) -> Tensor:
    mean, std = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def _fake_trainer(training: bool, epoch: int = 0, position: int = 0, rank: int = 0) -> Any:
    """What ``on_after_batch_transfer`` reads of the trainer: the stage and the batch's position."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=position))
    return SimpleNamespace(
        training=training,
        current_epoch=epoch,
        global_rank=rank,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_on_after_batch_transfer(cifar10_folder: Path, channels_last: bool) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_folder), batch_size=16, channels_last=channels_last))
    images, labels = next(iter(dm.train_dataloader()))
    expected = normalize(images, MEAN10, STD10)

    dm.trainer = _fake_trainer(training=False)  # validation, test, predict: normalize only
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    torch.testing.assert_close(x, expected)
    assert y is labels and x.is_contiguous(memory_format=torch.channels_last) == channels_last

    dm.trainer = _fake_trainer(training=True, epoch=2, position=5)
    x, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not torch.equal(x, expected)
    _match_windows(_unnormalize(x, dm), images)

    # the crops and flips are a function of the batch's (rank, epoch, position), not of the global RNG
    torch.manual_seed(123)
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], x)
    for other in (_fake_trainer(True, 2, 6), _fake_trainer(True, 3, 5), _fake_trainer(True, 2, 5, rank=1)):
        dm.trainer = other
        assert not torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], x)

    dm.augment = False
    torch.testing.assert_close(dm.on_after_batch_transfer((images, labels), 0)[0], expected)


class _RecordingModel(LightningModule):
    """A linear model that keeps the first batch of each stage (as the step saw it)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)
        self.batches: dict[str, tuple[Tensor, Tensor]] = {}

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        self.batches.setdefault(stage, batch)
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.layer(batch[0].flatten(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_augments_only_training_batches(cifar10_zip: Path, tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(cifar10_zip), batch_size=16, eval_batch_size=40)
    model = _RecordingModel()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    predictions = trainer.predict(model, datamodule=dm)
    assert sum(len(p) for p in predictions) == len(dm.test_dataset)
    x, _ = model.batches["train"]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    assert (_unnormalize(x, dm) == 0).all(1).any()  # zero padding shifted in: the batch was cropped
    for stage in ("val", "test"):
        x, y = model.batches[stage]
        assert torch.equal(y, dm.test_dataset.labels[:40])
        torch.testing.assert_close(x, normalize(dm.test_dataset.images[:40], MEAN10, STD10))


# ---------------------------------------------------------------------------------------------- val_split


def test_val_split(cifar10_pickle: Path, fake_cifar10: FakeCifar) -> None:
    dm = _setup(CIFAR10DataModule(str(cifar10_pickle), batch_size=8, val_split=0.25, seed=3))
    assert len(dm.val_dataset) == 20 and len(dm.train_dataset) == 60
    assert torch.bincount(dm.val_dataset.labels).tolist() == [2] * 10  # stratified
    seen = torch.cat([dm.train_dataset.images, dm.val_dataset.images]).flatten(1)
    everything = fake_cifar10.train_images.flatten(1)
    assert len(torch.unique(seen, dim=0)) == 80  # disjoint
    assert torch.equal(torch.unique(seen, dim=0), torch.unique(everything, dim=0))  # and covering
    assert torch.equal(dm.test_dataset.images, fake_cifar10.test_images)  # test stays the test set

    again = _setup(CIFAR10DataModule(str(cifar10_pickle), val_split=0.25, seed=3))
    assert torch.equal(again.val_dataset.images, dm.val_dataset.images)
    other = _setup(CIFAR10DataModule(str(cifar10_pickle), val_split=0.25, seed=4))
    assert not torch.equal(other.val_dataset.images, dm.val_dataset.images)


@pytest.mark.parametrize(
    ("field", "value"),
    [("val_split", 1.0), ("val_split", -0.1), ("batch_size", 0), ("subset", 0), ("num_workers", -1)],
)
def test_invalid_arguments_name_the_field(cifar10_pickle: Path, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field}={value}"):
        CIFAR10DataModule(str(cifar10_pickle), **{field: value})


# ---------------------------------------------------------------------------------------------- DDP


def test_training_loader_shards_and_reshuffles_from_the_seed(cifar10_folder: Path) -> None:
    """Each rank's loader reads a disjoint shard; the order is a function of (seed, epoch) only."""
    dm = _setup(CIFAR10DataModule(str(cifar10_folder), batch_size=8))
    dm.train_dataset = TensorBatchDataset(dm.train_dataset.images, torch.arange(len(dm.train_dataset)))

    def epoch_ids(rank: int, epoch: int, seed: int = 0) -> Tensor:
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=epoch)  # type: ignore[assignment]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PL_GLOBAL_SEED", str(seed))
            loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning does not wrap it again
        batches = [ids for _, ids in loader]
        assert len(batches) == len(loader) == 40 // 8 and all(len(ids) == 8 for ids in batches)
        return torch.cat(batches)

    epochs = []
    for epoch in range(2):
        ranks = [epoch_ids(rank, epoch) for rank in range(2)]
        assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
        assert sorted(torch.cat(ranks).tolist()) == list(range(80))
        epochs.append(ranks[0])
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert torch.equal(epoch_ids(0, 1), epochs[1])  # and the same order when asked again
    assert not torch.equal(epoch_ids(0, 1, seed=1), epochs[1])  # another run seed, another order


class _IdentifiedCIFAR10(CIFAR10DataModule):
    """Training labels replaced by sample ids, so a rank's batches tell which samples it read."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.train_dataset = TensorBatchDataset(
            self.train_dataset.images, torch.arange(len(self.train_dataset))
        )


class _IdRecorder(LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 1)
        self.out = out
        self.ids: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.ids.append(batch[1])
        return self.layer(batch[0].flatten(1)).mean()

    def on_train_epoch_end(self) -> None:
        torch.save(torch.cat(self.ids), self.out / f"rank{self.global_rank}-epoch{self.current_epoch}.pt")
        self.ids = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_ddp_spawn_ranks_read_disjoint_shards(cifar10_folder: Path, tmp_path: Path) -> None:
    dm = _IdentifiedCIFAR10(str(cifar10_folder), batch_size=8, augment=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[CloseProcessGroup()],
    )
    trainer.fit(_IdRecorder(tmp_path), datamodule=dm)
    for epoch in range(2):
        ids = [torch.load(tmp_path / f"rank{rank}-epoch{epoch}.pt") for rank in range(2)]
        assert len(ids[0]) == len(ids[1]) == 40
        assert sorted(torch.cat(ids).tolist()) == list(range(80))
    assert not torch.equal(torch.load(tmp_path / "rank0-epoch0.pt"), torch.load(tmp_path / "rank0-epoch1.pt"))


# ---------------------------------------------------------------------------------------------- errors


def _assert_fails(root: Path | str, match: str, cache: Path, **kwargs: Any) -> DatasetError:
    """Constructing and preparing the DataModule raises one DatasetError naming ``match``; no cache is left."""
    with pytest.raises(DatasetError) as info:
        _setup(CIFAR10DataModule(str(root), **kwargs))
    assert match in str(info.value)
    assert _cache_files(cache) == []
    return info.value


def test_missing_root(tmp_path: Path, qlight_cache: Path) -> None:
    error = _assert_fails(tmp_path / "nowhere", str(tmp_path / "nowhere"), qlight_cache)
    assert "does not exist" in str(error) and "download: true" in str(error)


def test_root_without_any_layout(tmp_path: Path, qlight_cache: Path) -> None:
    (tmp_path / "notes.txt").write_text("not CIFAR")
    error = _assert_fails(tmp_path, str(tmp_path), qlight_cache)
    assert "notes.txt" in str(error) and "cifar-10-batches-py" in str(error) and ".zip" in str(error)


def test_file_that_is_not_a_zip(tmp_path: Path, qlight_cache: Path) -> None:
    (tmp_path / "data.zip").write_bytes(b"garbage")
    _assert_fails(
        tmp_path / "data.zip", f"{tmp_path / 'data.zip'} is a file but not a readable .zip", qlight_cache
    )


def test_zip_without_train_and_test(tmp_path: Path, qlight_cache: Path) -> None:
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        archive.writestr("images/cat/0.png", b"")
    _assert_fails(
        tmp_path / "data.zip", f"zip {tmp_path / 'data.zip'} holds no train/ and test/", qlight_cache
    )


def test_wrong_number_of_classes(cifar10_folder: Path, tmp_path: Path, qlight_cache: Path) -> None:
    root = Path(shutil.copytree(cifar10_folder, tmp_path / "data"))
    for split in ("train", "test"):
        shutil.rmtree(root / split / "truck")
    error = _assert_fails(root, str(root), qlight_cache)
    assert "9 class folders" in str(error) and "expected 10" in str(error)


def test_class_names_differ_between_train_and_test(
    cifar10_folder: Path, tmp_path: Path, qlight_cache: Path
) -> None:
    root = Path(shutil.copytree(cifar10_folder, tmp_path / "data"))
    (root / "test" / "truck").rename(root / "test" / "lorry")
    error = _assert_fails(root, str(root), qlight_cache)
    assert "only in train ['truck'], only in test ['lorry']" in str(error)


def test_unreadable_image_in_folder(cifar10_folder: Path, tmp_path: Path, qlight_cache: Path) -> None:
    root = Path(shutil.copytree(cifar10_folder, tmp_path / "data"))
    (root / "train" / "dog" / "0003.png").write_bytes(b"not an image")
    _assert_fails(root, f"cannot read image train/dog/0003.png in {root}", qlight_cache)


def test_wrongly_sized_image_in_zip(cifar10_folder: Path, tmp_path: Path, qlight_cache: Path) -> None:
    tree = Path(shutil.copytree(cifar10_folder, tmp_path / "tree" / "cifar10"))
    Image.new("RGB", (33, 32)).save(tree / "test" / "ship" / "0001.png")
    path = write_zip(tmp_path / "tree", tmp_path / "data.zip")
    error = _assert_fails(path, f"image cifar10/test/ship/0001.png in zip {path} is 33x32", qlight_cache)
    assert "expected 32x32" in str(error)


def test_unreadable_image_in_zip(cifar10_zip: Path, tmp_path: Path, qlight_cache: Path) -> None:
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(cifar10_zip) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"\x89PNG broken" if name.endswith("bird/0002.png") else source.read(name))
    _assert_fails(path, f"cannot read image cifar10/train/bird/0002.png in zip {path}", qlight_cache)


def test_missing_pickled_batch(cifar10_pickle: Path, tmp_path: Path, qlight_cache: Path) -> None:
    root = Path(shutil.copytree(cifar10_pickle, tmp_path / "data"))
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    _assert_fails(root, f"{root / 'cifar-10-batches-py' / 'data_batch_3'} is missing", qlight_cache)


def test_download_while_offline(tmp_path: Path, qlight_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "cifar"
    error = _assert_fails(
        root,
        f"could not download CIFAR-10 from {qlight.data.sources.CIFAR10.url} into {root}",
        qlight_cache,
        download=True,
    )
    assert "Temporary failure in name resolution" in str(error)
    assert not (root / "cifar-10-batches-py").exists()


def test_download_skipped_when_data_are_present(
    cifar10_pickle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", None)  # any network access would fail loudly
    assert len(_setup(CIFAR10DataModule(str(cifar10_pickle), download=True)).train_dataset) == 80


# ---------------------------------------------------------------------------------------------- real data


def test_real_cifar10_zip_subset(shared_cifar10_zip: Path) -> None:
    dm = CIFAR10DataModule(str(shared_cifar10_zip), subset=1000, test_subset=500)
    start = time.perf_counter()
    _setup(dm)
    print(f"decoded 1500 real CIFAR-10 images in {time.perf_counter() - start:.2f} s")
    assert dm.classes[0] == "airplane" and dm.classes[-1] == "truck"
    assert torch.bincount(dm.train_dataset.labels).tolist() == [100] * 10
    assert torch.bincount(dm.test_dataset.labels).tolist() == [50] * 10
    mean = dm.train_dataset.images.float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(mean, MEAN10, atol=0.03, rtol=0)  # real photos, not noise


@pytest.mark.slow
def test_real_cifar10_zip_full(shared_cifar10_zip: Path) -> None:
    dm = CIFAR10DataModule(str(shared_cifar10_zip))
    start = time.perf_counter()
    _setup(dm)
    print(f"decoded 60000 real CIFAR-10 images in {time.perf_counter() - start:.1f} s")
    assert dm.train_dataset.images.shape == (50000, 3, 32, 32)
    assert dm.test_dataset.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(dm.train_dataset.labels).tolist() == [5000] * 10
    assert torch.bincount(dm.test_dataset.labels).tolist() == [1000] * 10
    start = time.perf_counter()
    _setup(CIFAR10DataModule(str(shared_cifar10_zip)))
    assert time.perf_counter() - start < 10  # the cache makes the next start fast
