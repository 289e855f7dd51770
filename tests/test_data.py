import gzip
import struct

import numpy as np
import pytest
import torch

from onceforall.data import (FASHION_MNIST_DIRS, FASHION_MNIST_SHA256, augment, epoch_order,
                             load_dataset, step_generator, train_batch)
from onceforall.errors import UserError


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _idx_folder(tmp_path, n=300, size=28):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", n // 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, size, size)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))
    return tmp_path


def test_idx_folder_loads_with_a_held_out_validation_split(tmp_path):
    data = load_dataset(str(_idx_folder(tmp_path)), val_size=50)
    assert (len(data.train), len(data.val), len(data.test)) == (250, 50, 100)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)


FASHION = FASHION_MNIST_DIRS[0]
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")


@needs_fashion
def test_fashion_mnist_from_the_image_path_is_checksum_verified():
    import hashlib

    for stem, want in FASHION_MNIST_SHA256.items():  # the constants are those of the installed files
        assert hashlib.sha256(gzip.decompress((FASHION / f"{stem}.gz").read_bytes())).hexdigest() == want
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.classes[0] == "T-shirt/top" and data.source == str(FASHION)
    assert abs(data.mean[0] - 0.286) < 0.01


def _fashion_copy(folder, damage=None, gunzip=()):
    """Fashion-MNIST's four files in ``folder``: ``gunzip`` ones uncompressed, ``damage`` one changed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_SHA256:
        raw = gzip.decompress((FASHION / f"{stem}.gz").read_bytes())
        if stem == damage:
            raw = raw[:-1] + bytes([(raw[-1] + 1) % 10])  # one label of one image: still a valid IDX file
        if stem in gunzip:
            (folder / stem).write_bytes(raw)
        else:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=1))  # not Debian's .gz
    return folder


@needs_fashion
def test_a_folder_holding_fashion_mnist_is_recognised_by_content(tmp_path):
    data = load_dataset(str(_fashion_copy(tmp_path / "copy", gunzip={"t10k-labels-idx1-ubyte"})))
    assert data.name == "fashion-mnist" and data.classes[9] == "Ankle boot"


@needs_fashion
def test_a_damaged_fashion_mnist_file_is_a_clear_error(tmp_path):
    _fashion_copy(tmp_path, damage="t10k-labels-idx1-ubyte")
    with pytest.raises(UserError, match=r"sha256 .* is not Fashion-MNIST's") as e:
        load_dataset(str(tmp_path))
    assert e.value.source.endswith("t10k-labels-idx1-ubyte.gz") and "dataset-fashion-mnist" in e.value.fix


@needs_fashion
def test_fashion_mnist_in_s3_is_checksum_verified(s3_server, tmp_path, monkeypatch):
    from onceforall.stages import open_data

    monkeypatch.setenv("OFA_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.bucket()
    s3 = s3_server.client()
    for name, folder in (("good", _fashion_copy(tmp_path / "good")),
                         ("bad", _fashion_copy(tmp_path / "bad", damage="train-labels-idx1-ubyte"))):
        for f in folder.iterdir():
            s3.upload_file(str(f), bucket[5:], f"datasets/{name}/{f.name}")
    data = open_data(f"{bucket}/datasets/good", val_size=100)
    assert data.name == "fashion-mnist" and data.source == f"{bucket}/datasets/good"
    with pytest.raises(UserError, match="not Fashion-MNIST's") as e:
        open_data(f"{bucket}/datasets/bad")
    assert "train-labels-idx1-ubyte" in e.value.source


def test_fashion_mnist_is_never_downloaded(tmp_path, monkeypatch):
    import onceforall.data as data_mod
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (tmp_path / "empty",))
    with pytest.raises(UserError, match="Fashion-MNIST is not in") as e:
        load_dataset("fashion-mnist")
    assert e.value.field == "data" and "s3://" in e.value.fix and "image" in e.value.fix


def test_fashion_mnist_requires_all_four_checksums(tmp_path, monkeypatch):
    import onceforall.data as data_mod

    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (_idx_folder(tmp_path),))  # random IDX files
    with pytest.raises(UserError, match="is not Fashion-MNIST's"):
        load_dataset("fashion-mnist")


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no such dataset folder") as info:
        load_dataset(str(tmp_path / "nope"))
    assert info.value.field == "data"


def test_folder_without_a_dataset(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="neither IDX files"):
        load_dataset(str(tmp_path))


def test_missing_idx_file(tmp_path):
    _idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels"):
        load_dataset(str(tmp_path))


def test_bad_magic_number(tmp_path):
    _idx_folder(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(UserError, match="bad magic") as info:
        load_dataset(str(tmp_path))
    assert "train-images" in info.value.source


def test_truncated_idx(tmp_path):
    _idx_folder(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(UserError, match="truncated"):
        load_dataset(str(tmp_path))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    data = load_dataset(str(tmp_path), val_size=4, image_size=28)
    assert data.classes == ("cat", "dog") and data.train.images.shape[1:] == (1, 28, 28)
    assert len(data.train) + len(data.val) == 24 and len(data.test) == 8


def test_image_folder_with_mismatched_classes(tmp_path):
    from PIL import Image

    for split, cls in (("train", "cat"), ("test", "dog")):
        (tmp_path / split / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / cls / "0.png")
    with pytest.raises(UserError, match="class folders"):
        load_dataset(str(tmp_path))


def test_batches_are_a_function_of_seed_epoch_and_step(tiny_data):
    order = epoch_order(len(tiny_data.train), 3, 1)
    a = train_batch(tiny_data, order, 2, 32, seed=3, epoch=1)
    b = train_batch(tiny_data, order, 2, 32, seed=3, epoch=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Two ranks together see exactly the global batch.
    r0 = train_batch(tiny_data, order, 2, 32, seed=3, epoch=1, rank=0, world=2)
    r1 = train_batch(tiny_data, order, 2, 32, seed=3, epoch=1, rank=1, world=2)
    assert torch.equal(torch.cat([r0[0], r1[0]]).sort(0).values, a[0].sort(0).values)


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 28 * 28, dtype=torch.uint8).view(2, 1, 28, 28)
    y = augment(x, step_generator(0))
    assert y.shape == x.shape and y.dtype == x.dtype
