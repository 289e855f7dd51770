"""Datasets held in memory as uint8 tensors, with batched augmentation on tensors.

Streamed ImageNet-layout folders (``imagefolder:PATH``, read on demand) live in imagefolder.py;
:func:`load_dataset` opens them too, and the batch functions below serve both kinds.

Sources: Fashion-MNIST IDX files (baked into the image at /usr/share/datasets/fashion-mnist, where
Debian's ``dataset-fashion-mnist`` puts them too, or any folder or ``s3://`` prefix holding them),
ImageFolder trees of small images, and a synthetic dataset for tests. A validation split is held out
from the training set; the test set is for final numbers.

Nothing is downloaded over HTTP: a pod of a cluster without egress could not, and the official files
are served over plain HTTP. Fashion-MNIST files are checked against the sha256 of the release wherever
they are found (:data:`FASHION_MNIST_SHA256`); a mismatch is an error, not a silently different dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
#: Where ``--data fashion-mnist`` finds the IDX files: the project's image bakes them in here, and
#: Debian's ``dataset-fashion-mnist`` (``make`` installs it on a laptop) puts them here as well.
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
#: sha256 of each Fashion-MNIST IDX file's decompressed bytes. Hashing the IDX bytes, not the .gz, keeps
#: them valid for recompressed copies (Debian's .gz differ from Zalando's, their contents do not) and
#: for uncompressed ones. Computed from Debian's package and equal to the sha256 others publish for
#: the raw files of Zalando's release (whose .gz match Zalando's published MD5 sums).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_FASHION_MNIST_FIX = ("the file is damaged or not Fashion-MNIST's: copy the four original IDX files "
                      "again (apt-get install --reinstall dataset-fashion-mnist, or Zalando's release; "
                      "a copy of s3:// data is cached under $OFA_CACHE: delete it)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    classes: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "crop-flip"  # random crop with padding + horizontal flip

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "classes": list(self.classes),
                "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "image_size": self.image_size, "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(spec: str, *, val_size: int = 5000, seed: int = 0,
                 image_size: int | None = None) -> Dataset:
    """``fashion-mnist``, ``synthetic[:N]``, a folder holding IDX files or an ImageFolder tree of
    small images (loaded into memory), or streamed (``image_size`` is not used): ``imagefolder:PATH``
    (a folder or s3:// prefix of ``train/<class>/`` and ``val/<class>/``: imagefolder.py) or
    ``shards:PATH`` (tar shards in the WebDataset layout: shards.py). Training reads streamed data
    through stream.py; small sets such as Fashion-MNIST stay in memory, where batches cost no decoding.

    IDX files of Fashion-MNIST are checked against :data:`FASHION_MNIST_SHA256`: always for
    ``fashion-mnist``, and in a folder as soon as one of its files is Fashion-MNIST's (so a damaged copy
    fails, while another IDX dataset such as MNIST, with the same file names, loads as it is).
    """
    if spec.startswith("imagefolder:"):
        from .imagefolder import open_image_folder

        return open_image_folder(spec, val_size=val_size, seed=seed)  # type: ignore[return-value]
    if spec.startswith("shards:"):
        from .shards import open_shards

        return open_shards(spec, val_size=val_size, seed=seed)  # type: ignore[return-value]
    if spec == "fashion-mnist":
        folder = _find_fashion_mnist()
        train, test, _ = _read_idx_folder(folder, require_fashion_mnist=True)
        return _finish("fashion-mnist", str(folder), FASHION_MNIST_CLASSES, train, test, val_size, seed)
    if spec.startswith("synthetic"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 2000
        return synthetic_dataset(n, seed=seed, val_size=min(val_size, n // 5))
    path = Path(spec)
    if not path.exists():
        raise UserError("no such dataset folder", source=spec, field="data",
                        fix="give fashion-mnist, synthetic, a folder with IDX files or "
                            "train/ and test/ class folders, or imagefolder:PATH")
    if not path.is_dir():
        raise UserError("dataset must be a folder", source=spec, field="data",
                        fix="give the folder that holds the IDX files or train/ and test/")
    if _idx_present(path):
        train, test, fashion = _read_idx_folder(path, require_fashion_mnist=False)
        if fashion:
            return _finish("fashion-mnist", str(path), FASHION_MNIST_CLASSES, train, test, val_size, seed)
        return _finish(path.name, str(path), tuple(str(i) for i in range(int(train.labels.max()) + 1)),
                       train, test, val_size, seed)
    if (path / "train").is_dir():
        return _load_image_folder(path, val_size=val_size, seed=seed, image_size=image_size)
    raise UserError("folder holds neither IDX files nor train/ and test/ class folders",
                    source=spec, field="data",
                    fix=f"put {', '.join(IDX_FILES.values())} (optionally .gz) there, "
                        "or train/<class>/*.png and test/<class>/*.png")


def _finish(name: str, source: str, classes: tuple[str, ...], train: ImageSet, test: ImageSet,
            val_size: int, seed: int) -> Dataset:
    if not 0 <= val_size < len(train):
        raise UserError(f"val_size {val_size} must be between 0 and the {len(train)} training images",
                        field="val_size", fix="use a smaller validation split")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=gen)
    val, train = train.subset(perm[:val_size].sort().values), train.subset(perm[val_size:].sort().values)
    x = train.images.float() / 255
    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3)))
    return Dataset(name, source, classes, train, val, test, mean, std)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_present(folder: Path) -> bool:
    return any(_idx_path(folder, stem) for stem in IDX_FILES.values())


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped) as a numpy array; malformed files raise UserError."""
    return _parse_idx(_idx_bytes(path), path)


def _idx_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read ({exc})", source=str(path),
                        fix="copy the file again; it is damaged") from None


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError("not an IDX file of unsigned bytes (bad magic number)", source=str(path),
                        field="header", fix="use the original IDX files of the dataset")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise UserError(f"header says {dims} = {int(np.prod(dims))} bytes, body has {len(body)}",
                        source=str(path), field="body", fix="the file is truncated; copy it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_folder(folder: Path, *, require_fashion_mnist: bool) -> tuple[ImageSet, ImageSet, bool]:
    """Train and test sets of an IDX folder, and whether it is Fashion-MNIST (every sha256 matched)."""
    raws, paths = {}, {}
    for key, stem in IDX_FILES.items():
        path = _idx_path(folder, stem)
        if path is None:
            raise UserError(f"missing {stem}[.gz]", source=str(folder), field="data",
                            fix=f"the folder needs all of {', '.join(IDX_FILES.values())}")
        raws[stem], paths[stem] = _idx_bytes(path), path
    digests = {stem: hashlib.sha256(raw).hexdigest() for stem, raw in raws.items()}
    fashion = [digests[stem] == want for stem, want in FASHION_MNIST_SHA256.items()]
    if require_fashion_mnist or any(fashion):
        for stem, want in FASHION_MNIST_SHA256.items():
            if digests[stem] != want:
                raise UserError(f"sha256 {digests[stem][:16]}... is not Fashion-MNIST's {want[:16]}...",
                                source=str(paths[stem]), field="data", fix=_FASHION_MNIST_FIX)
    arrays = {key: _parse_idx(raws[stem], paths[stem]) for key, stem in IDX_FILES.items()}
    sets = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{split} images {images.shape} and labels {labels.shape} do not match",
                            source=str(folder), field=split,
                            fix="use the matching images and labels files")
        sets.append(ImageSet(torch.from_numpy(images.copy()).unsqueeze(1),
                             torch.from_numpy(labels.astype(np.int64))))
    return sets[0], sets[1], all(fashion)


def _find_fashion_mnist() -> Path:
    for folder in FASHION_MNIST_DIRS:
        if folder.is_dir() and all(_idx_path(folder, s) for s in IDX_FILES.values()):
            return folder
    raise UserError("Fashion-MNIST is not in " + ", ".join(map(str, FASHION_MNIST_DIRS)), field="data",
                    fix="use the project's image (it holds the files), `apt-get install "
                        "dataset-fashion-mnist` on a laptop, or pass the four IDX files as a folder or "
                        "s3://bucket/prefix")


def _load_image_folder(root: Path, *, val_size: int, seed: int, image_size: int | None) -> Dataset:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (or ``val/``), small images in RAM."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise UserError("ImageFolder datasets need Pillow", fix="pip install pillow") from None
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not test_dir.is_dir():
        raise UserError("ImageFolder dataset has train/ but no test/ (or val/)", source=str(root),
                        field="test", fix="add a test/ folder with the same class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError("train/ has no class folders", source=str(root / "train"), field="train",
                        fix="put images in train/<class name>/")

    def read(split_dir: Path) -> ImageSet:
        names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if names != classes:
            raise UserError(f"class folders {names} differ from train/'s {classes}",
                            source=str(split_dir), field="classes",
                            fix="give every split the same class folders")
        images, labels = [], []
        for label, name in enumerate(classes):
            for f in sorted((split_dir / name).iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(f) as im:
                        im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
                        if image_size:
                            im = im.resize((image_size, image_size), Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.uint8)
                except OSError as exc:
                    raise UserError(f"cannot read image ({exc})", source=str(f),
                                    fix="remove or replace the damaged file") from None
                images.append(arr[:, :, None] if arr.ndim == 2 else arr)
                labels.append(label)
        if not images:
            raise UserError("no images found", source=str(split_dir),
                            fix=f"put {'/'.join(IMAGE_SUFFIXES)} files in the class folders")
        shapes = {a.shape for a in images}
        if len(shapes) != 1:
            raise UserError(f"images have different sizes {sorted(shapes)[:3]}", source=str(split_dir),
                            fix="resize them to one size, or pass image_size")
        stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return ImageSet(stacked, torch.tensor(labels, dtype=torch.int64))

    train, test = read(root / "train"), read(test_dir)
    return _finish(root.name, str(root), tuple(classes), train, test, min(val_size, len(train) // 5),
                   seed)


def synthetic_dataset(n: int = 2000, *, seed: int = 0, size: int = 28, channels: int = 1,
                      classes: int = 10, val_size: int = 400) -> Dataset:
    """Learnable toy data: class c is horizontal stripes of frequency 1 + c % 5 at brightness
    level c // 5, plus noise. Stripes survive the crop-and-flip augmentation."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    freq = torch.tensor([1 + c % 5 for c in range(classes)], dtype=torch.float32).view(-1, 1, 1, 1)
    level = torch.tensor([0.3 + 0.4 * (c // 5) / max(1, (classes - 1) // 5) for c in range(classes)])
    protos = level.view(-1, 1, 1, 1) + 0.25 * torch.sin(2 * torch.pi * freq * rows / size)
    protos = protos.expand(classes, channels, size, size)

    def make(count: int) -> ImageSet:
        labels = torch.randint(0, classes, (count,), generator=gen)
        x = protos[labels] + 0.1 * torch.randn(count, channels, size, size, generator=gen)
        return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    return _finish("synthetic", f"synthetic:{n}", tuple(str(i) for i in range(classes)),
                   make(n), make(max(n // 5, 10)), val_size, seed)


# ---------------------------------------------------------------------------------------------
# Batches


def step_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (seed, phase, epoch, step, ...)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear (antialiased) resize to ``resolution`` x ``resolution``; channels-last output."""
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding, and a random horizontal flip, per image."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=step_generator(seed, 1, epoch))


def train_batch(data: Dataset, order: torch.Tensor, step: int, batch_size: int, *, seed: int,
                epoch: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch ``step`` of an epoch, augmented, this rank's share of it, normalized float."""
    idx = order[step * batch_size:(step + 1) * batch_size]
    images = data.train.images[idx]
    if data.augment:
        images = augment(images, step_generator(seed, 2, epoch, step))
    x = normalize(images[rank::world], data.mean, data.std)
    return x, data.train.labels[idx][rank::world]


def is_streamed(data) -> bool:
    """Whether ``data`` reads its images on demand (imagefolder.StreamedDataset)."""
    return bool(getattr(data, "streamed", False))


def head_rows(data: Dataset, num_classes: int) -> torch.Tensor | None:
    """The classifier rows ``data``'s labels index (a streamed dataset with fewer classes than the
    head: imagefolder.py), or None: every row, labels are row numbers."""
    rows = tuple(getattr(data, "head", ()) or ())
    if not rows or rows == tuple(range(num_classes)):
        return None
    return torch.tensor(rows, dtype=torch.int64)


def in_memory(data: Dataset) -> Dataset:
    """``data``, which training needs held in memory: a streamed dataset is a clear error."""
    if is_streamed(data):
        raise UserError("training reads its images from memory; a streamed imagefolder: dataset "
                        "serves specialization only", source=data.source, field="data",
                        fix="specialize a trained supernet (ofa run --supernet URI), or train on a "
                            "folder of small images (no imagefolder: prefix)")
    return data


def eval_batches(data: Dataset, split: str, resolution: int, batch_size: int = 1000,
                 limit: int | None = None, *, device: torch.device | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized images of ``split`` at ``resolution`` (channels-last) and their labels, on
    ``device`` (default the CPU).

    Held in memory: resized from the native size. Streamed: the reference's evaluation transform
    (resize the shorter side, center-crop; imagefolder.py), read batch by batch. The pixels go to
    ``device`` as uint8 (a quarter of the bytes) and are normalized and resized there."""
    if is_streamed(data):
        from .imagefolder import pixel_batches

        for x, y in pixel_batches(data, split, resolution, min(batch_size, 200), limit):  # type: ignore
            x, y = _to(x, device), _to(y, device)
            yield resize(normalize(x, data.mean, data.std), resolution), y
        return
    images: ImageSet = getattr(data, split)
    n = len(images) if limit is None else min(limit, len(images))
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        x, y = _to(images.images[sl], device), _to(images.labels[sl], device)
        yield resize(normalize(x, data.mean, data.std), resolution), y


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters are: evaluation feeds its batches there."""
    return next(model.parameters()).device


def _to(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def calibration_images(data: Dataset, num_images: int, seed: int) -> torch.Tensor:
    """A fixed, seeded subset of training images for BN recalibration (normalized, full size)."""
    if is_streamed(data):
        raise UserError("a streamed dataset's calibration images depend on the resolution",
                        source=data.source, field="data",
                        fix="use calibration_batches(data, n, seed, resolution)")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=gen)[:num_images]
    return normalize(data.train.images[idx], data.mean, data.std)


def calibration_batches(data: Dataset, num_images: int, seed: int, resolution: int,
                        batch_size: int = 200, *, device: torch.device | None = None
                        ) -> Iterator[torch.Tensor]:
    """The BN recalibration images at ``resolution``, normalized, in batches (bn.recalibrate_bn),
    on ``device`` (default the CPU).

    Held in memory: :func:`calibration_images` resized. Streamed: the same seeded subset of training
    images under the reference's training transform at ``resolution`` (imagefolder.py)."""
    if is_streamed(data):
        from .imagefolder import calibration_pixel_batches

        for x in calibration_pixel_batches(data, num_images, seed, resolution, batch_size):  # type: ignore
            yield resize(normalize(_to(x, device), data.mean, data.std), resolution)
        return
    calib = _to(calibration_images(data, num_images, seed), device)
    for start in range(0, len(calib), batch_size):
        yield resize(calib[start:start + batch_size], resolution)


def subsample(data: Dataset, train: int | None, val: int | None = None) -> Dataset:
    """The first ``train``/``val`` images (for smoke schedules)."""
    pick = lambda s, n: s if n is None or n >= len(s) else s.subset(torch.arange(n))  # noqa: E731
    return replace(data, train=pick(data.train, train), val=pick(data.val, val))
