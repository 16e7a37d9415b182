"""Find, decode and cache CIFAR from any of its three on-disk forms.

A CIFAR root is one of (a) torchvision's pickled batches (``cifar-10-batches-py`` /
``cifar-100-python`` inside the root, downloadable), (b) an image-folder tree
``<root>/{train,test}/<class>/*.png|jpg`` (optionally inside one extra top-level folder) or (c) a
``.zip`` of such a tree, read in place. Whatever the form, the images are decoded once into uint8
tensors and saved as one ``torch.save`` file in a cache directory, keyed by the source's path, sizes
and modification times, so every later run (and every DDP rank) starts by loading one file.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import pickle
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision.datasets
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from torchvision.datasets import utils as tv_utils

from qlight.data.base import DatasetError, save_atomic

#: Bump when the cache's content or decoding changes, so old cache files are not reused.
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Fewer images than this per extra decoding process are decoded faster in-process.
IMAGES_PER_WORKER = 2048
SPLITS = ("train", "test")


@dataclass(frozen=True)
class CifarSpec:
    """What distinguishes CIFAR-10 from CIFAR-100 on disk.

    Args:
        name: short name used in cache file names and messages (``cifar10``).
        title: human-readable name for messages (``CIFAR-10``).
        num_classes: number of classes the image folders must have.
        pickle_folder: folder of torchvision's pickled layout inside the root.
        train_files: pickled training batches inside ``pickle_folder``.
        test_files: pickled test batches inside ``pickle_folder``.
        meta_file: pickled metadata file holding the class names.
        label_key: key of the labels in each batch.
        names_key: key of the class names in the metadata.
        url: download address of the pickled archive.
        archive: file name of the downloaded archive.
        md5: checksum of the archive, checked by torchvision.
    """

    name: str
    title: str
    num_classes: int
    pickle_folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    url: str
    archive: str
    md5: str


CIFAR10 = CifarSpec(
    name="cifar10",
    title="CIFAR-10",
    num_classes=10,
    pickle_folder=torchvision.datasets.CIFAR10.base_folder,
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    url=torchvision.datasets.CIFAR10.url,
    archive=torchvision.datasets.CIFAR10.filename,
    md5=torchvision.datasets.CIFAR10.tgz_md5,
)

CIFAR100 = CifarSpec(
    name="cifar100",
    title="CIFAR-100",
    num_classes=100,
    pickle_folder=torchvision.datasets.CIFAR100.base_folder,
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    url=torchvision.datasets.CIFAR100.url,
    archive=torchvision.datasets.CIFAR100.filename,
    md5=torchvision.datasets.CIFAR100.tgz_md5,
)


@dataclass(frozen=True)
class Source:
    """A located CIFAR source.

    Args:
        kind: which of the three layouts it is.
        path: the pickled-batches folder, the folder holding ``train``/``test``, or the zip file.
    """

    kind: Literal["pickle", "folder", "zip"]
    path: Path


def _expected_layouts(spec: CifarSpec) -> str:
    """The one explanation of valid roots, shared by every "not found" error."""
    return (
        f"expected one of: (a) a folder holding torchvision's pickled batches <root>/{spec.pickle_folder} "
        f"(download: true fetches them from {spec.url}); (b) an image-folder tree "
        f"<root>/train/<class>/*.png|jpg and <root>/test/<class>/*.png|jpg with {spec.num_classes} class "
        "folders, optionally inside one extra top-level folder; (c) a .zip file of such a tree "
        "(e.g. ../shared/data/cifar10-jpeg.zip)"
    )


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-directories of ``path``, skipping hidden ones such as ``.DS_Store`` folders."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_folder_root(root: Path) -> Path | None:
    """The folder that holds ``train/`` and ``test/``: ``root`` itself or its one sub-folder."""
    if all((root / split).is_dir() for split in SPLITS):
        return root
    nested = [d for d in _visible_dirs(root) if all((d / split).is_dir() for split in SPLITS)]
    return nested[0] if len(nested) == 1 else None


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch torchvision's pickled archive into ``root``; network failures become a DatasetError.

    A failed download leaves nothing behind: the partial archive and the folders created for it are
    removed, so the next run does not find an empty ``root`` and report it as holding no data.
    """
    rank_zero_info(f"Downloading {spec.title} from {spec.url} into {root}")
    created = [p for p in (root, *root.parents) if not p.exists()]
    archive_existed = (root / spec.archive).exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(spec.url, str(root), filename=spec.archive, md5=spec.md5)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError on md5
        if not archive_existed:
            (root / spec.archive).unlink(missing_ok=True)
        for folder in created:  # innermost first; only folders this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise DatasetError(
            f"could not download {spec.title} from {spec.url} into {root}: {err}. On a machine without "
            f"internet, fetch {spec.archive} elsewhere and extract it into {root}, or point root at an "
            "image folder or .zip of the data, and set download: false."
        ) from err


def resolve_source(spec: CifarSpec, root: str | os.PathLike[str], download: bool = False) -> Source:
    """Find which of the three layouts ``root`` holds, downloading the pickled one if asked.

    Args:
        spec: CIFAR-10 or CIFAR-100.
        root: a directory or a ``.zip`` file.
        download: fetch torchvision's pickled batches into ``root`` when no layout is there.

    Returns:
        The located source.

    Raises:
        DatasetError: if ``root`` is missing or holds none of the layouts, or the download fails.
    """
    root = Path(root).expanduser().absolute()
    if root.is_file():
        if zipfile.is_zipfile(root):
            return Source("zip", root)
        raise DatasetError(f"{root} is a file but not a readable .zip archive; {_expected_layouts(spec)}")
    if root.is_dir():
        if (root / spec.pickle_folder).is_dir():
            return Source("pickle", root / spec.pickle_folder)
        if root.name == spec.pickle_folder:
            return Source("pickle", root)
        folder = _find_folder_root(root)
        if folder is not None:
            return Source("folder", folder)
    if download and root.suffix.lower() != ".zip":
        _download(spec, root)
        return Source("pickle", root / spec.pickle_folder)
    if not root.exists():
        raise DatasetError(f"{spec.title} root {root} does not exist; {_expected_layouts(spec)}")
    found = sorted(p.name for p in root.iterdir())[:10]
    raise DatasetError(f"{root} holds no {spec.title} data (found {found}); {_expected_layouts(spec)}")


Tree = dict[str, dict[str, list[str]]]
"""``{split: {class: sorted image names}}`` of a folder or zip tree."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _sorted_tree(tree: Tree) -> Tree:
    return {split: {cls: sorted(names) for cls, names in classes.items()} for split, classes in tree.items()}


def _zip_tree(spec: CifarSpec, path: Path, members: list[str]) -> Tree:
    """The images of a zip, whose ``train/`` and ``test/`` sit at the top or in one top-level folder."""
    members = [m for m in members if not m.startswith("__MACOSX")]
    tops = {m.split("/", 1)[0] for m in members}
    prefixes = ["", *(f"{top}/" for top in tops if len(tops) == 1)]
    for prefix in prefixes:
        if all(any(m.startswith(f"{prefix}{split}/") for m in members) for split in SPLITS):
            break
    else:
        raise DatasetError(
            f"zip {path} holds no train/ and test/ folders at its top level or inside one top-level folder "
            f"(top level: {sorted(tops)[:10]}); {_expected_layouts(spec)}"
        )
    tree: Tree = {split: {} for split in SPLITS}
    for member in members:
        parts = member.removeprefix(prefix).split("/") if member.startswith(prefix) else []
        if len(parts) == 3 and parts[0] in tree and _is_image(parts[2]):
            tree[parts[0]].setdefault(parts[1], []).append(member)
    return _sorted_tree(tree)


def _folder_tree(path: Path) -> Tree:
    """The images of a folder tree, as paths relative to ``path``."""
    tree: Tree = {split: {} for split in SPLITS}
    for split in SPLITS:
        for class_dir in _visible_dirs(path / split):
            files = [f"{split}/{class_dir.name}/{p.name}" for p in class_dir.iterdir() if _is_image(p.name)]
            if files:
                tree[split][class_dir.name] = files
    return _sorted_tree(tree)


def _check_classes(spec: CifarSpec, tree: Tree, where: str) -> list[str]:
    """The sorted class names of a tree, after checking their count and train/test agreement.

    Raises:
        DatasetError: if a split has no images, the class count is not ``spec.num_classes`` or the
            class names differ between ``train`` and ``test``.
    """
    for split, classes in tree.items():
        if not classes:
            raise DatasetError(
                f"{where} has no images in {split}/<class>/; expected {split}/<class>/*.png|jpg with "
                f"{spec.num_classes} class folders"
            )
    train, test = sorted(tree["train"]), sorted(tree["test"])
    if len(train) != spec.num_classes:
        raise DatasetError(
            f"{where} has {len(train)} class folders with images in train/, expected {spec.num_classes} "
            f"for {spec.title} (one folder per class, named by class; found {train[:12]})"
        )
    if train != test:
        raise DatasetError(
            f"class folders differ between train/ and test/ in {where}: only in train "
            f"{sorted(set(train) - set(test))}, only in test {sorted(set(test) - set(train))}; both must "
            f"hold the same {spec.num_classes} class folders"
        )
    return train


def _where(source: Source) -> str:
    """How messages name a folder or zip source."""
    return f"zip {source.path}" if source.kind == "zip" else str(source.path)


class _ImageReader:
    """Reads and decodes the images of one folder or zip tree; one instance per process.

    Args:
        source: a ``folder`` or ``zip`` source.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.archive = zipfile.ZipFile(source.path) if source.kind == "zip" else None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def decode(self, names: list[str]) -> bytes:
        """The images as concatenated 32 x 32 x 3 (height, width, RGB) bytes."""
        return b"".join(map(self._decode_one, names))

    def _decode_one(self, name: str) -> bytes:
        try:
            data = self.archive.read(name) if self.archive else (self.source.path / name).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                if size == (32, 32):
                    return (image if image.mode == "RGB" else image.convert("RGB")).tobytes()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt files
            raise DatasetError(
                f"cannot read image {name} in {_where(self.source)}: {err}; expected a 32x32 RGB PNG or "
                "JPEG (replace or delete the file)"
            ) from err
        raise DatasetError(
            f"image {name} in {_where(self.source)} is {size[0]}x{size[1]}, expected 32x32 as in CIFAR "
            "(resize the file or delete it)"
        )


_worker_reader: _ImageReader | None = None


def _init_worker(source: Source) -> None:
    global _worker_reader
    _worker_reader = _ImageReader(source)


def _decode_in_worker(names: list[str]) -> bytes:
    assert _worker_reader is not None
    return _worker_reader.decode(names)


def _decode_images(source: Source, names: list[str]) -> Tensor:
    """Decode 32x32 images of a folder or zip tree into one ``N x 3 x 32 x 32`` uint8 tensor.

    PIL needs ~0.15 ms per CIFAR JPEG, so the 60k images of CIFAR are split over forked worker
    processes when there are cores to spare (forked, not spawned: a spawned worker would spend
    seconds importing torch). Each worker opens the zip itself, as a shared file offset is not safe.
    """
    workers = min(_cpu_count(), 16, len(names) // IMAGES_PER_WORKER)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        reader = _ImageReader(source)
        try:
            raw = bytearray(reader.decode(names))
        finally:
            reader.close()
    else:
        size = -(-len(names) // (4 * workers))  # 4 chunks per worker balance the load
        chunks = [names[i : i + size] for i in range(0, len(names), size)]
        raw = bytearray()
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (source,)) as pool:
            for part in pool.imap(_decode_in_worker, chunks):
                raw += part
    return torch.frombuffer(raw, dtype=torch.uint8).view(-1, 32, 32, 3).permute(0, 3, 1, 2).contiguous()


def _cpu_count() -> int:
    """Cores this process may use (the affinity mask under SLURM or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one of torchvision's pickled CIFAR files, naming the file if that fails."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError as err:
        raise DatasetError(
            f"{path} is missing; {path.parent} must hold torchvision's pickled CIFAR layout "
            "(delete the folder and set download: true to fetch it again)"
        ) from err
    except Exception as err:  # unpickling can raise nearly anything on a corrupt file
        raise DatasetError(
            f"cannot unpickle {path}: {err!r}; delete {path.parent} and set download: true to fetch it again"
        ) from err


def _read_batches(spec: CifarSpec, folder: Path, files: Iterable[str]) -> tuple[Tensor, Tensor]:
    """Concatenate pickled batches into uint8 images and int64 labels."""
    images, labels = [], []
    for file in files:
        batch = _unpickle(folder / file)
        try:
            data = torch.as_tensor(batch["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
            target = torch.as_tensor(batch[spec.label_key], dtype=torch.int64)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{folder / file} is not a {spec.title} batch ({err!r}): expected 'data' (N x 3072 uint8) "
                f"and '{spec.label_key}' (N ints)"
            ) from err
        if len(data) != len(target) or (
            len(target) and not 0 <= int(target.min()) <= int(target.max()) < spec.num_classes
        ):
            raise DatasetError(
                f"{folder / file} has {len(data)} images and {len(target)} labels; expected as many labels "
                f"in [0, {spec.num_classes})"
            )
        images.append(data)
        labels.append(target)
    return torch.cat(images), torch.cat(labels)


def stratified_subset(labels: Tensor, n: int) -> Tensor:
    """Indices (ascending) of the first ``n`` images taken round-robin over the classes.

    Every class gets ``n // num_classes`` or one more image (while it has images), the earliest
    ones in source order, so a subset is balanced and the same for every run.
    """
    ranks = _class_ranks(labels, torch.arange(len(labels)))
    key = ranks * (int(labels.max()) + 1) + labels
    return torch.argsort(key, stable=True)[:n].sort().values


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (train, held-out) with ``round(fraction * n_c)`` of each class held out.

    The held-out images of a class are a random draw that depends only on ``seed``, so every rank
    and every run (``fit`` and a later ``validate``) gets the same split.
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ranks = _class_ranks(labels, order)
    n_held = torch.round(torch.bincount(labels).double() * fraction).long()
    held = ranks < n_held[labels]
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


def _class_ranks(labels: Tensor, order: Tensor) -> Tensor:
    """Position of every element among the elements of its class when visited in ``order``."""
    ordered = labels[order]
    by_class = torch.argsort(ordered, stable=True)
    counts = torch.bincount(ordered)
    starts = torch.cumsum(counts, 0) - counts
    ranks_ordered = torch.empty_like(ordered)
    ranks_ordered[by_class] = torch.arange(len(ordered)) - starts[ordered[by_class]]
    ranks = torch.empty_like(labels)
    ranks[order] = ranks_ordered
    return ranks


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_path(
    spec: CifarSpec, source: Source, cache_dir: Path, subset: int | None, test_subset: int | None
) -> Path:
    """The cache file for ``source``: its name hashes every input that changes the decoded tensors.

    Folder trees are keyed by every image file's size and modification time (a ``stat`` per
    file, well under a second for CIFAR), so replacing an image invalidates the cache.
    """
    if source.kind == "zip":
        stats = [_stat(source.path)]
    elif source.kind == "pickle":
        files = (*spec.train_files, *spec.test_files, spec.meta_file)
        stats = [_stat(source.path / f) if (source.path / f).is_file() else [f, None] for f in files]
    else:
        tree = _folder_tree(source.path)
        stats = [
            _stat(source.path / n) for classes in tree.values() for names in classes.values() for n in names
        ]
    key = json.dumps([CACHE_VERSION, spec.name, source.kind, stats, subset, test_subset])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{spec.name}-{source.kind}-{digest}.pt"


def decode(
    spec: CifarSpec, source: Source, subset: int | None = None, test_subset: int | None = None
) -> dict[str, Any]:
    """Read a source into uint8 image and int64 label tensors.

    Args:
        spec: CIFAR-10 or CIFAR-100.
        source: where the data are (see :func:`resolve_source`).
        subset: keep only a class-balanced subset of this many training images (decoding only those).
        test_subset: the same for the test set.

    Returns:
        ``{"train_images", "train_labels", "test_images", "test_labels", "classes"}``; images are
        ``N x 3 x 32 x 32`` uint8, labels int64, classes the class names in label order.

    Raises:
        DatasetError: on missing, unreadable or wrongly sized images or class folders.
    """
    limits = {"train": subset, "test": test_subset}
    if source.kind == "pickle":
        return _decode_pickle(spec, source.path, limits)
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as archive:
            tree = _zip_tree(spec, source.path, archive.namelist())
    else:
        tree = _folder_tree(source.path)
    return _decode_tree(spec, source, tree, limits)


def _decode_pickle(spec: CifarSpec, folder: Path, limits: dict[str, int | None]) -> dict[str, Any]:
    """Read torchvision's pickled batches (see :func:`decode`)."""
    meta = _unpickle(folder / spec.meta_file)
    classes = list(meta.get(spec.names_key, []))
    if len(classes) != spec.num_classes:
        raise DatasetError(
            f"{folder / spec.meta_file} lists {len(classes)} class names under '{spec.names_key}', "
            f"expected {spec.num_classes} for {spec.title}"
        )
    data: dict[str, Any] = {"classes": classes}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        images, labels = _read_batches(spec, folder, files)
        limit = limits[split]
        if limit is not None:
            keep = stratified_subset(labels, limit)
            images, labels = images[keep], labels[keep]
        data[f"{split}_images"], data[f"{split}_labels"] = images.contiguous(), labels
    return data


def _decode_tree(
    spec: CifarSpec, source: Source, tree: Tree, limits: dict[str, int | None]
) -> dict[str, Any]:
    """Decode the images of a folder or zip tree (see :func:`decode`)."""
    classes = _check_classes(spec, tree, _where(source))
    data: dict[str, Any] = {"classes": classes}
    for split, by_class in tree.items():
        names = [name for cls in classes for name in by_class[cls]]
        labels = torch.tensor([i for i, cls in enumerate(classes) for _ in by_class[cls]], dtype=torch.int64)
        limit = limits[split]
        if limit is not None:
            keep = stratified_subset(labels, limit)
            names, labels = [names[i] for i in keep.tolist()], labels[keep]
        data[f"{split}_images"], data[f"{split}_labels"] = _decode_images(source, names), labels
    return data


def ensure_cached(
    spec: CifarSpec,
    root: str | os.PathLike[str],
    cache_dir: Path,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
) -> Path:
    """Decode ``root`` into the cache unless an up-to-date cache file exists; return the file.

    Args:
        spec: CIFAR-10 or CIFAR-100.
        root: the source (see :func:`resolve_source`).
        cache_dir: folder of cache files.
        download: fetch torchvision's pickled batches when ``root`` holds no data.
        subset: see :func:`decode`.
        test_subset: see :func:`decode`.

    Returns:
        The cache file (written atomically, so a failure leaves none behind).
    """
    source = resolve_source(spec, root, download)
    path = cache_path(spec, source, cache_dir, subset, test_subset)
    if not path.is_file():
        start = time.perf_counter()
        data = decode(spec, source, subset, test_subset)
        save_atomic(data, path)
        n = len(data["train_labels"]) + len(data["test_labels"])
        rank_zero_info(
            f"Decoded {n} {spec.title} images from {source.path} in {time.perf_counter() - start:.1f} s; "
            f"cached in {path}"
        )
    return path
