import gzip
import struct

import numpy as np
import pytest
import torch

from onceforall.data import (FASHION_MNIST_DIRS, augment, epoch_order, load_dataset,
                             step_generator, train_batch)
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


@pytest.mark.skipif(not FASHION_MNIST_DIRS[0].is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist", download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.classes[0] == "T-shirt/top"
    assert abs(data.mean[0] - 0.286) < 0.01


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
