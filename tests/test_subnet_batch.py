"""SubnetBatch: the array form of many subnet configs agrees with SubnetConfig."""

from __future__ import annotations

import numpy as np
import pytest

from onceforall.errors import UserError
from onceforall.supernet.space import SubnetConfig, fashion_mnist_space, imagenet_mbv3_space
from onceforall.supernet.subnet_batch import SubnetBatch, as_batch, choice_index


@pytest.mark.parametrize("make_space", [fashion_mnist_space, imagenet_mbv3_space])
def test_roundtrip_and_canonical_form(make_space):
    space = make_space()
    cfgs = space.sample_many(np.random.default_rng(0), 50)
    batch = SubnetBatch.from_configs(cfgs)
    assert batch.to_configs(space) == cfgs
    latent = SubnetBatch.sample(space, np.random.default_rng(1), 50)
    assert latent.to_configs(space) == [c.canonical(space) for c in
                                        (SubnetConfig(int(latent.r[i]), tuple(latent.d[i]),
                                                      tuple(latent.k[i]), tuple(latent.e[i]))
                                         for i in range(50))]
    expected = np.array([[c.is_active(s, space.max_depth) for s in range(space.num_slots)]
                         for c in cfgs])
    assert np.array_equal(batch.active(space), expected)


def test_row_operations():
    space = fashion_mnist_space()
    a = SubnetBatch.sample(space, np.random.default_rng(2), 6)
    b = SubnetBatch.repeat(space.max_config(), 2)
    assert SubnetBatch.from_genes(b.genes(), len(space.units)).to_configs(space) == [space.max_config()] * 2
    assert np.array_equal(a.take(np.array([0, 2])).k, a.k[[0, 2]])
    assert len(SubnetBatch.concat([a, b])) == 8
    assert as_batch(space.min_config()).to_configs(space) == [space.min_config()]
    with pytest.raises(ValueError):
        SubnetBatch(np.zeros(2), np.zeros((3, 4)), np.zeros((2, 16)), np.zeros((2, 16)))


def test_indices_validate_only_active_slots():
    space = fashion_mnist_space()
    assert choice_index(np.array([3, 5, 7, 4, 0, -1, 99]), (7, 3, 5)).tolist() == [0, 1, 2, -1, -1,
                                                                                    -1, -1]
    cfg = space.min_config()
    k = list(cfg.k)
    k[3] = 0  # slot 3 is skipped at depth 2: any value is fine there
    r_idx, k_idx, _, act = SubnetBatch.from_configs([SubnetConfig(cfg.r, cfg.d, tuple(k), cfg.e)]
                                                    ).indices(space)
    assert r_idx.tolist() == [0] and k_idx[0, 3] == 0 and not act[0, 3]
    k[0] = 4
    with pytest.raises(UserError, match="k"):
        SubnetBatch.from_configs([SubnetConfig(cfg.r, cfg.d, tuple(k), cfg.e)]).indices(space)
