"""Training batches of a streamed dataset (imagefolder.py), decoded by DataLoader workers.

The in-memory path (data.train_batch) holds every image as a uint8 tensor; a streamed dataset holds
only its file list. Here a batch sampler, in the training process, walks the same stream as the
in-memory path: global step ``g`` is batch ``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``
under data.epoch_order's seeded permutation, this rank's share ``[rank::world]`` of it (the micro-batch
shares as in train.run_phase), decoded at the resolution the step needs (``resolution_of(g)``:
train.run_phase draws it from the same seeded generator as the step's subnets). Workers read and decode
the images of a share with the reference's training transform (mit-han-lab/once-for-all,
``imagenet.py`` build_train_transform: RandomResizedCrop(r, scale 0.08-1), horizontal flip, and the
``tf`` colour jitter of ``train_ofa_net.py``: imagefolder.calibration_transform), its randomness
seeded per (seed, epoch, step, image): a batch's pixels do not depend on which worker decoded it.

Memory: the file list, and at most ``workers * prefetch`` decoded shares in flight.
Resume: the sampler starts at the resumed global step; nothing is replayed and the batches after it
are the ones the uninterrupted run decodes (tests/test_stream.py).
A damaged image stops training with an error naming the file (see :func:`train_shares`).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np
import torch

from . import epoch_order, normalize, resize
from ..errors import UserError
from .imagefolder import FolderSplit, calibration_transform, read_image, to_uint8

PREFETCH = 2  # decoded shares each worker keeps ready


class _TrainImages(torch.utils.data.Dataset):
    """Item ``(index, resolution, epoch, step)``: that training image under the training transform."""

    def __init__(self, split: FolderSplit, seed: int):
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, resolution, epoch, step = key
        rng = np.random.default_rng([self.seed, 3, epoch, step, index])
        try:
            img = read_image(self.split.files[index])
        except UserError as exc:  # re-raised in the training process as it was (train_shares)
            raise _Damaged(json.dumps([exc.what, exc.source, exc.field, exc.fix])) from None
        return to_uint8(calibration_transform(img, resolution, rng)), self.split.labels[index]


class _Damaged(RuntimeError):
    """A damaged image, raised in a worker (UserError's keyword fields do not cross processes)."""


class StepShares(torch.utils.data.Sampler):
    """Lists of dataset keys: for every global step from ``start`` to ``stop``, this rank's
    ``micro_batches`` shares of the step's global batch, in the order the training loop takes them."""

    def __init__(self, n: int, batch_size: int, seed: int, steps_per_epoch: int, start: int, stop: int,
                 resolution_of: Callable[[int], int], rank: int = 0, world: int = 1,
                 micro_batches: int = 1):
        self.n, self.batch_size, self.seed, self.spe = n, batch_size, seed, steps_per_epoch
        self.start, self.stop, self.resolution_of = start, stop, resolution_of
        self.rank, self.world, self.micro = rank, world, micro_batches

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.micro

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        order, order_epoch = None, -1
        for g in range(self.start, self.stop):
            epoch, step = divmod(g, self.spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            res, stride = int(self.resolution_of(g)), self.world * self.micro
            for share in range(self.micro):
                yield [(int(i), res, epoch, step) for i in idx[self.rank * self.micro + share::stride]]


def _fresh_s3_client(_worker: int) -> None:
    from ..infra import store

    store.client.cache_clear()  # a boto3 client is not to be shared across processes


def rank_workers(data) -> int:
    """This rank's decoding processes. One process: the dataset's ``workers``. Several ranks in the
    pod (torchrun's ``LOCAL_WORLD_SIZE``): each its share of the pod's cores less one for itself, at
    least 1 and at most 8 (the reference's ``n_worker`` per GPU); 0 stays 0 (decode in the rank)."""
    workers = int(getattr(data, "workers", 0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not workers or local <= 1:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // local - 1))


def train_shares(data, sampler: StepShares, *, seed: int,
                 workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The sampler's shares decoded: (normalized float (B, 3, r, r) channels-last, labels), by
    ``workers`` processes (default :func:`rank_workers`).

    A damaged image is an error naming it, not a skip: skipping would give one rank a smaller share
    than the others (their batch-norm statistics and gradient averages would silently differ) for a
    fault that a correct copy of the dataset does not have."""
    workers = rank_workers(data) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _TrainImages(data.train, seed), batch_sampler=sampler, num_workers=workers,
        worker_init_fn=_fresh_s3_client if workers else None,
        prefetch_factor=PREFETCH if workers else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed))  # not torch's global one: dropout's stream
    try:
        for x, y in loader:
            yield resize(normalize(x, data.mean, data.std), x.shape[-1]), y
    except _Damaged as exc:
        # from a worker, the message is its traceback; the error's fields are on its last line
        last = str(exc).strip().splitlines()[-1].split("_Damaged: ", 1)[-1]
        what, source, field, fix = json.loads(last)
        raise UserError(what, source=source, field=field, fix=fix) from None
