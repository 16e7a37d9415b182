"""ImageNet input pipeline throughput: decoded, random-resized-cropped uint8 images per second.

On ImageNet the CPU side (JPEG decode + crop + resize in DataLoader workers) usually limits a GPU
step, so the number to know is images/s per worker: a ResNet-18 on one H100 consumes several thousand
images/s, which sets how many workers (CPU cores) each GPU needs.

Without ``--data-root`` the script writes ``--images`` synthetic JPEGs of a typical ImageNet size
(500x375, quality 90) into a temporary ImageNet layout first. Examples::

    python benchmarks/imagenet_loader.py --workers 2
    python benchmarks/imagenet_loader.py --data-root /data/imagenet --workers 16 --batches 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from qlight.data import ImageNetDataModule


def write_fake_imagenet(root: Path, images: int, classes: int = 10) -> Path:
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth random content compresses like a photo, unlike white noise
            small = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8, generator=g).float()
            photo = torch.nn.functional.interpolate(small[None], size=(375, 500), mode="bicubic")[0]
            pixels = photo.clamp(0, 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=None, help="an ImageNet folder (default: synthetic JPEGs)")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="class folders in --data-root (default 1000)"
    )
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches (after one warm-up batch)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--baseline", action="store_true", help="also time torchvision's ImageFolder + PIL pipeline"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            root, classes = Path(args.data_root), args.num_classes or 1000
        else:
            root, classes = write_fake_imagenet(Path(tmp) / "imagenet", args.images), 10
        dm = ImageNetDataModule(
            str(root),
            num_classes=classes,
            batch_size=args.batch_size,
            num_workers=args.workers,
            image_size=args.image_size,
            cache_dir=str(Path(tmp) / "cache"),
            pin_memory=False,
        )
        dm.prepare_data()
        dm.setup("fit")
        results = {"qlight": _rate(dm.train_dataloader(), args.batches)}
        if args.baseline:
            results["torchvision_pil"] = _rate(_torchvision_loader(root, args), args.batches)
    for name, rate in results.items():
        per_worker = rate / max(args.workers, 1)
        print(f"{name:>15}: {rate:,.0f} images/s with {args.workers} workers ({per_worker:,.0f} per worker)")
    print(json.dumps({"workers": args.workers, "batch_size": args.batch_size, "images_per_s": results}))


def _rate(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], batches: int) -> float:
    """Images/s over ``batches`` batches after the first (workers started, first batch decoded)."""
    iterator = iter(loader)
    next(iterator)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(iterator)
        except StopIteration:
            break
        n += len(images)
    return n / (time.perf_counter() - start)


def _torchvision_loader(root: Path, args: argparse.Namespace) -> DataLoader:
    """The common reference pipeline: ImageFolder with PIL decoding and torchvision v2 transforms."""
    import torchvision
    import torchvision.transforms.v2 as T

    transform = T.Compose(
        [T.RandomResizedCrop(args.image_size, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()]
    )
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )


if __name__ == "__main__":
    main()
