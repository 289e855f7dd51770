"""ImageNet-layout data, streamed: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` read on demand.

``--data imagefolder:PATH`` (a folder or an ``s3://bucket/prefix``) opens one. Only the list of files
is held in memory; every image is read and decoded when a batch needs it, by a torch DataLoader
(from S3 one object per image, no copy of the dataset on disk). Splits as for every dataset here:
``train`` less a seeded held-out ``val`` split (the predictor's data and the search's feedback),
and ``test`` = the folder's ``val/`` (or ``test/``): ImageNet's 50,000 validation images, the
numbers a model card reports.

Transforms follow MIT's reference (mit-han-lab/once-for-all,
``ofa/imagenet_classification/data_providers/imagenet.py``), implemented on Pillow as torchvision
does for PIL images:

* evaluation, per resolution r (``build_valid_transform``): resize the shorter side to
  ``ceil(r / 0.875)`` with bilinear (PIL, antialiased), then center-crop r x r. The reference
  writes ``int(math.ceil(image_size / 0.875))``; for r = 224 both ceil and int give 256.
* BN calibration (``build_sub_train_loader``: a fixed random subset of *training* images under the
  *training* transform at the active resolution): random-resized-crop to r (scale 0.08..1, ratio
  3/4..4/3), random horizontal flip, and the ``tf`` colour jitter (brightness 32/255, saturation 0.5,
  in random order) that ``train_ofa_net.py`` sets. The randomness here is seeded per image, so a
  subnet's recalibration is reproducible.
* normalisation with ImageNet's mean and std (the published supernets were trained with them).

Classes and the classifier head: a class folder's label is its row of the supernet's classifier.
Without ``classes.txt`` the folders sorted by name are rows 0, 1, ... (torchvision's ImageFolder
order: for ImageNet's 1,000 wnid folders, the published head's order). A ``classes.txt`` at the
root (one name a line, the head's rows in order, e.g. ImageNet's 1,000 wnids) names the rows
instead, so a folder of a few ImageNet classes keeps their rows of the published head. Where the
folders are fewer than the head's rows, the head is sliced to their rows (``StreamedDataset.head``):
evaluation, the predictor's data and the exported model classify among the dataset's classes
only, and the card's output lists them. With every row present, nothing is sliced.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterator

import numpy as np
import torch

from ..infra import store
from ..errors import UserError

PREFIX = "imagefolder:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP = 0.875  # the reference's resize_scale of the evaluation transform
SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
CLASSES_FILE = "classes.txt"


def is_imagefolder(spec: str) -> bool:
    return spec.startswith(PREFIX)


@dataclass(frozen=True)
class FolderSplit:
    """A split as file URIs (local paths or s3://) and labels; no pixels."""

    files: tuple[str, ...]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, idx: torch.Tensor) -> "FolderSplit":
        return FolderSplit(tuple(self.files[int(i)] for i in idx), self.labels[idx])


@dataclass(frozen=True)
class StreamedDataset:
    """The interface of data.Dataset, with splits read on demand: training reads it through
    stream.py, the stages after training (predictor data, search feedback, export) through
    :func:`pixel_batches` and :func:`calibration_pixel_batches`."""

    name: str
    source: str
    classes: tuple[str, ...]
    train: FolderSplit
    val: FolderSplit
    test: FolderSplit
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    head: tuple[int, ...] = ()  # the classifier's row of each class (module docstring)
    workers: int = 0  # DataLoader processes decoding images; 0: in this process
    augment: str = "random-resized-crop"
    streamed: bool = True
    channels: int = 3
    image_size: None = None  # images of any size: each resolution has its own transform

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "classes": list(self.classes),
                "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "image_size": None, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std), "streamed": True, "head_rows": list(self.head),
                "eval_transform": f"resize shorter side to ceil(r / {EVAL_CROP}) (bilinear), "
                                  "center-crop r",
                "calibration_transform": "random-resized-crop r (scale 0.08-1), flip, colour jitter "
                                         "(brightness 32/255, saturation 0.5)"}


# ---------------------------------------------------------------------------------------------
# Opening


def default_workers() -> int:
    """Decoding processes: the cores this process may use, less one for the model, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def open_image_folder(spec: str, *, val_size: int = 5000, seed: int = 0,
                      workers: int | None = None) -> StreamedDataset:
    """``imagefolder:PATH`` or ``imagefolder:s3://bucket/prefix``: list the files, read nothing else."""
    root = spec[len(PREFIX):].rstrip("/") if is_imagefolder(spec) else spec.rstrip("/")
    if not root:
        raise UserError("imagefolder: needs a folder or s3:// prefix", source=spec, field="data",
                        fix="write imagefolder:/data/imagenet or imagefolder:s3://bucket/imagenet")
    files = list_tree(root, spec)
    test_split = "val" if any(f.startswith("val/") for f in files) else "test"
    by_split = {s: sorted(f for f in files if f.startswith(f"{s}/") and f.count("/") == 2
                          and PurePosixPath(f).suffix.lower() in SUFFIXES)
                for s in ("train", test_split)}
    for split, names in by_split.items():
        if not names:
            raise UserError(f"no images under {split}/<class>/", source=spec, field="data",
                            fix=f"put {'/'.join(SUFFIXES)} files in train/<class>/ and val/<class>/")
    classes, head = _classes(root, files, by_split)
    index = {c: i for i, c in enumerate(classes)}

    def split(names: list[str]) -> FolderSplit:
        return FolderSplit(tuple(store.join(root, n) for n in names),
                           torch.tensor([index[n.split("/")[1]] for n in names], dtype=torch.int64))

    return assemble(root, PREFIX, classes, split(by_split["train"]), split(by_split[test_split]),
                    head=head, val_size=val_size, seed=seed, workers=workers)


def assemble(root: str, prefix: str, classes: tuple[str, ...], train: FolderSplit, test: FolderSplit, *,
             head: tuple[int, ...], val_size: int, seed: int, workers: int | None) -> StreamedDataset:
    """The dataset of a listed tree (ImageFolder or shards): the training split less a seeded held-out
    validation split (``val_size`` images; a fifth of them when out of range), and the test split."""
    if not 0 <= val_size < len(train):
        val_size = len(train) // 5
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val, train = train.subset(perm[:val_size].sort().values), train.subset(perm[val_size:].sort().values)
    name = PurePosixPath(root.split("://", 1)[-1]).name or root
    return StreamedDataset(name, f"{prefix}{root}", classes, train, val, test, head=head,
                           workers=default_workers() if workers is None else workers)


def list_tree(root: str, spec: str, what: str = "train/ and val/") -> list[str]:
    """Every file under ``root`` (a folder or s3:// prefix); a missing or empty one is a UserError."""
    if not store.is_s3(root) and not os.path.isdir(root):
        raise UserError("no such folder", source=spec, field="data",
                        fix=f"give the folder (or s3:// prefix) that holds {what}")
    files = store.files_under(root)
    if not files:
        raise UserError("empty", source=spec, field="data", fix=f"upload {what} first")
    return files


def _classes(root: str, files: list[str],
             by_split: dict[str, list[str]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The class folders in the head's order, and the head's row of each."""
    present = set().union(*({n.split("/")[1] for n in names} for names in by_split.values()))
    if CLASSES_FILE not in files:
        classes = tuple(sorted(present))
        return classes, tuple(range(len(classes)))
    rows = [line.strip() for line in store.read_text(store.join(root, CLASSES_FILE)).splitlines()
            if line.strip()]
    missing = sorted(present - set(rows))
    if missing:
        raise UserError(f"class folders {missing[:3]} are not in {CLASSES_FILE}",
                        source=store.join(root, CLASSES_FILE), field="classes",
                        fix="list every class of the classifier, one a line, in its order")
    head = tuple(i for i, name in enumerate(rows) if name in present)
    return tuple(rows[i] for i in head), head


# ---------------------------------------------------------------------------------------------
# Transforms (Pillow, as torchvision applies them to PIL images)


def read_image(uri: str):
    """One image as an RGB PIL image; a damaged file is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = _read_bytes(uri)
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image ({exc})", source=uri,
                        fix="remove or replace the damaged file") from None


def _read_bytes(uri: str) -> bytes:
    """A file's bytes, or a tar shard's member's (shards.py: the same datasets, as shards)."""
    from . import shards

    return shards.read_member(uri) if shards.is_member(uri) else store.read_bytes(uri)


def eval_size(resolution: int) -> int:
    """The shorter side before the center crop: the reference's ``ceil(r / 0.875)``."""
    return int(math.ceil(resolution / EVAL_CROP))


def eval_transform(img, resolution: int):
    """Resize the shorter side to eval_size(r) (bilinear), then center-crop r x r."""
    from PIL import Image

    w, h = img.size
    short = eval_size(resolution)
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    return img.crop((left, top, left + resolution, top + resolution))


def calibration_transform(img, resolution: int, rng: np.random.Generator):
    """Random-resized-crop (scale 0.08..1, ratio 3/4..4/3), flip, brightness and saturation jitter."""
    from PIL import Image, ImageEnhance

    top, left, h, w = _random_resized_crop_box(img.size, rng)
    img = img.crop((left, top, left + w, top + h)).resize((resolution, resolution), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    brightness, saturation = rng.uniform(1 - 32 / 255, 1 + 32 / 255), rng.uniform(0.5, 1.5)
    for op in rng.permutation(2):
        img = (ImageEnhance.Brightness(img).enhance(brightness) if op == 0
               else ImageEnhance.Color(img).enhance(saturation))
    return img


def _random_resized_crop_box(size: tuple[int, int], rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries, then the whole image's central crop."""
    width, height = size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_uint8(img) -> torch.Tensor:
    """(3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Streaming


class _Images(torch.utils.data.Dataset):
    """Images of a split, read and transformed when asked for: (3, r, r) uint8 and the label."""

    def __init__(self, split: FolderSplit, transform: Callable[[object, int], object]):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_uint8(self.transform(read_image(self.split.files[i]), i)), self.split.labels[i]


def _fresh_s3_client(_worker: int) -> None:
    store.client.cache_clear()  # a boto3 client is not to be shared across processes


def _batches(data: StreamedDataset, images: _Images, batch_size: int) -> Iterator[tuple[torch.Tensor,
                                                                                   torch.Tensor]]:
    workers = min(data.workers, max(0, (len(images) - 1) // batch_size))  # no idle processes
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, worker_init_fn=_fresh_s3_client,
                                         persistent_workers=False)
    yield from loader


def pixel_batches(data: StreamedDataset, split: str, resolution: int, batch_size: int = 100,
                  limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``split`` under the evaluation transform at ``resolution``: ((B, 3, r, r) uint8, (B,) labels),
    in file order."""
    part: FolderSplit = getattr(data, split)
    if limit is not None and limit < len(part):
        part = part.subset(torch.arange(limit))
    yield from _batches(data, _Images(part, lambda img, i: eval_transform(img, resolution)), batch_size)


def calibration_pixel_batches(data: StreamedDataset, num_images: int, seed: int, resolution: int,
                              batch_size: int = 200) -> Iterator[torch.Tensor]:
    """A fixed, seeded subset of training images under the reference's calibration (training)
    transform at ``resolution``: (B, 3, r, r) uint8. The same (seed, resolution) gives the same
    pixels every time."""
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:num_images]
    part = data.train.subset(idx)

    def transform(img, i: int):
        rng = np.random.default_rng([seed, resolution, int(idx[i])])
        return calibration_transform(img, resolution, rng)

    for x, _ in _batches(data, _Images(part, transform), batch_size):
        yield x
