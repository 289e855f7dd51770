"""Tar shards in the WebDataset layout, streamed: ``--data shards:PATH_OR_S3``.

The layout (WebDataset's conventions, the subset supported here): ``PATH/train/*.tar`` and
``PATH/val/*.tar`` (or ``test/``), uncompressed POSIX tar files, conventionally named
``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... (any names; read in sorted order). A sample is
the members that share a key: the member's path up to the first dot of its file name
(``n01440764/n01440764_10026.jpg`` and ``n01440764/n01440764_10026.cls`` are sample
``n01440764/n01440764_10026``, fields ``jpg`` and ``cls``). Each sample needs one image field
(``jpg``, ``jpeg``, ``png``, ``webp`` or ``bmp``; the first present in that order) and its class
index as ASCII digits in ``cls``; other fields (``json``, ``txt``, ...) are ignored. A
``classes.txt`` at ``PATH`` names the classes, one a line, in the index's order (otherwise they are
``0`` ... ``max(cls)``). Not supported: compressed shards (``.tar.gz``: no random access), brace
patterns of shard URLs, labels other than ``cls``.

Reading: opening lists every shard's members (local: the tar headers only, seeking past the data; s3:
each shard is read once, front to back, one member at a time in memory) and keeps, per sample, its
shard, the image's offset and size and the label. Images are then read on demand as byte ranges
(s3: one ranged GET per image), so training (stream.py) takes the in-memory path's seeded order and
a resumed run its exact batches, as for an ImageFolder tree: the dataset is an
imagefolder.StreamedDataset whose files are member URIs (``SHARD#tar:OFFSET:SIZE:MEMBER``).

A damaged member (an image that does not decode) is an error naming the shard and the member, as a
damaged file of an ImageFolder tree is (stream.train_shares says why not skip-and-count); a damaged
tar (a truncated shard) or a sample without an image or label is an error at opening.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath

import torch

from ..infra import store
from ..errors import UserError
from .imagefolder import CLASSES_FILE, FolderSplit, StreamedDataset, assemble, list_tree

PREFIX = "shards:"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp")
LABEL_FIELD = "cls"
MEMBER = "#tar:"
_FIX = "write shards as WebDataset does: uncompressed .tar, each sample's members key.jpg and key.cls"


def is_shards(spec: str) -> bool:
    return spec.startswith(PREFIX)


def is_member(uri: str) -> bool:
    return MEMBER in uri


def member_uri(shard: str, offset: int, size: int, name: str) -> str:
    return f"{shard}{MEMBER}{offset}:{size}:{name}"


def read_member(uri: str) -> bytes:
    """The bytes of a shard's member from its member URI: one ranged read."""
    shard, where = uri.split(MEMBER, 1)
    offset, size, _ = where.split(":", 2)
    return store.read_range(shard, int(offset), int(size))


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and field: the path up to the first dot of the file name, and the rest."""
    path = PurePosixPath(name)
    stem, _, field = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, field.lower()


def index_shard(shard: str) -> list[tuple[str, int]]:
    """``(member URI of the image, label)`` of every sample of one shard, in the shard's order."""
    samples: dict[str, dict[str, object]] = {}
    try:
        with store.open_stream(shard) as stream:
            mode = "r|" if store.is_s3(shard) else "r:"
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, field = _split_name(m.name)
                    fields = samples.setdefault(key, {})
                    if field == LABEL_FIELD:
                        fields[field] = tar.extractfile(m).read()
                    elif field in IMAGE_FIELDS:
                        fields[field] = member_uri(shard, m.offset_data, m.size, m.name)
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"not a readable tar shard ({exc})", source=shard, field="data",
                        fix=f"copy the shard again; {_FIX}") from None
    return [_sample(shard, key, fields) for key, fields in samples.items()]


def _sample(shard: str, key: str, fields: dict[str, object]) -> tuple[str, int]:
    image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
    if image is None or LABEL_FIELD not in fields:
        missing = "an image (" + "/".join(IMAGE_FIELDS) + ")" if image is None else "a .cls label"
        raise UserError(f"sample {key!r} has no {missing}", source=shard, field="data", fix=_FIX)
    raw = fields[LABEL_FIELD]
    try:
        label = int(raw.decode("ascii").strip())  # type: ignore[union-attr]
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"sample {key!r}: {key}.cls is {raw[:20]!r}, not a class index",  # type: ignore[index]
                        source=shard, field="data", fix="write the class index in ASCII digits") from None
    return str(image), label


def open_shards(spec: str, *, val_size: int = 5000, seed: int = 0,
                workers: int | None = None) -> StreamedDataset:
    """``shards:PATH`` or ``shards:s3://bucket/prefix``: index the shards, read no image."""
    root = spec[len(PREFIX):].rstrip("/") if is_shards(spec) else spec.rstrip("/")
    if not root:
        raise UserError("shards: needs a folder or s3:// prefix", source=spec, field="data",
                        fix="write shards:/data/imagenet-wds or shards:s3://bucket/imagenet-wds")
    files = list_tree(root, spec, "train/ and val/ shards")
    test_split = "val" if any(f.startswith("val/") for f in files) else "test"
    splits = {}
    for split in ("train", test_split):
        shards = [f for f in files if f.startswith(f"{split}/") and f.endswith(".tar")]
        if not shards:
            raise UserError(f"no .tar shards under {split}/", source=spec, field="data",
                            fix=f"put the shards in {split}/ ({_FIX})")
        samples = [s for f in shards for s in index_shard(store.join(root, f))]
        if not samples:
            raise UserError(f"the shards under {split}/ hold no samples", source=spec, field="data",
                            fix=_FIX)
        splits[split] = FolderSplit(tuple(u for u, _ in samples),
                                    torch.tensor([label for _, label in samples], dtype=torch.int64))
    classes = _classes(root, files, max(int(s.labels.max()) for s in splits.values()))
    return assemble(root, PREFIX, classes, splits["train"], splits[test_split],
                    head=tuple(range(len(classes))), val_size=val_size, seed=seed, workers=workers)


def _classes(root: str, files: list[str], max_label: int) -> tuple[str, ...]:
    if CLASSES_FILE not in files:
        return tuple(str(i) for i in range(max_label + 1))
    rows = tuple(line.strip() for line in store.read_text(store.join(root, CLASSES_FILE)).splitlines()
                 if line.strip())
    if max_label >= len(rows):
        raise UserError(f"a sample's class {max_label} is past the {len(rows)} names of {CLASSES_FILE}",
                        source=store.join(root, CLASSES_FILE), field="classes",
                        fix="list every class, one a line, in the order of the .cls indices")
    return rows
