import json

import numpy as np
import pytest

from onceforall.errors import UserError
from onceforall.supernet.space import PRESETS, SubnetConfig, get_space, load_space, space_yaml


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_yaml(name, tmp_path):
    space = get_space(name)
    path = tmp_path / "space.yaml"
    path.write_text(space_yaml(space))
    assert load_space(path) == space


def test_imagenet_space_is_the_papers():
    s = get_space("imagenet-mbv3")
    assert [u.width for u in s.units] == [24, 40, 80, 112, 160]
    assert s.resolutions == tuple(range(128, 225, 4))
    assert (s.depths, s.kernels, s.expands, s.num_classes) == ((2, 3, 4), (3, 5, 7), (3, 4, 6), 1000)
    # ((3*3)^2 + (3*3)^3 + (3*3)^4)^5 ~ 2e19 architectures (the paper's count), times 25 resolutions
    assert s.num_architectures() == (81 + 729 + 6561) ** 5 * 25


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sampling_is_seeded_and_valid(name):
    space = get_space(name)
    a = space.sample_many(np.random.default_rng(7), 50)
    b = space.sample_many(np.random.default_rng(7), 50)
    assert a == b
    assert len(set(a)) > 40
    for cfg in a:
        assert space.validate_config(cfg) == cfg
        assert SubnetConfig.from_dict(json.loads(cfg.to_json()), space) == cfg


def test_min_max_uniform():
    s = get_space("fashion-mnist")
    assert s.max_config().d == (4,) * 4 and set(s.max_config().k) == {7}
    assert s.min_config().r == 20 and set(s.min_config().e) == {3}
    u = s.uniform_config(3, 5, 4, 24)
    assert u.d == (3,) * 4 and u.k[0] == 5 and u.k[3] == 3  # skipped slot canonicalised to min


def test_canonical_form_ignores_skipped_blocks():
    s = get_space("fashion-mnist")
    cfg = s.uniform_config(2, 7, 6)
    other = SubnetConfig(cfg.r, cfg.d, tuple(5 if i % 4 >= 2 else 7 for i in range(16)), cfg.e)
    assert s.validate_config(other) == cfg


def _write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def _valid_yaml(tmp_path, **override):
    raw = get_space("fashion-mnist").to_dict()
    raw.update(override)
    import yaml

    return _write(tmp_path, yaml.safe_dump(raw))


@pytest.mark.parametrize("override, field", [
    ({"kernels": [3, 4]}, "kernels"),
    ({"depths": []}, "depths"),
    ({"expands": [3, 3]}, "expands"),
    ({"stem_stride": 3}, "stem_stride"),
    ({"units": [{"width": 24, "stride": 5}]}, "units[0].stride"),
    ({"units": [{"width": 24, "stride": 2, "act": "gelu"}]}, "units[0].act"),
    ({"resolutions": [4, 8]}, "resolutions"),
    ({"num_classes": 0}, "num_classes"),
    ({"bogus": 1}, "bogus"),
])
def test_inconsistent_space_yaml_names_the_field(tmp_path, override, field):
    path = _valid_yaml(tmp_path, **override)
    with pytest.raises(UserError) as info:
        load_space(path)
    assert info.value.field == field
    assert str(path) in info.value.line() and "fix:" in info.value.line()


def test_malformed_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\nunits: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(path)


def test_bad_subnet_config_names_the_key():
    s = get_space("fashion-mnist")
    with pytest.raises(UserError) as info:
        SubnetConfig.from_dict({"r": 28, "d": [4, 4, 4], "k": [7] * 16, "e": [6] * 16}, s, "cfg.json")
    assert info.value.field == "d"
    with pytest.raises(UserError) as info:
        SubnetConfig.from_dict({"r": 27, "d": [4] * 4, "k": [7] * 16, "e": [6] * 16}, s)
    assert info.value.field == "r"


def test_restrict_keeps_slot_layout():
    s = get_space("fashion-mnist")
    assert s.restrict(depths=[3, 4]).num_slots == s.num_slots
    with pytest.raises(UserError, match="largest depth"):
        s.restrict(depths=[2, 3])
