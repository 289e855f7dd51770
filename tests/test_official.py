"""Importing MIT's published OFA-MobileNetV3 supernets: bit-exact against the reference code.

The reference is the `ofa` package (0.1.0.post202307202001, a test dependency in pyproject.toml).
Its networks are built as its model zoo builds `ofa_mbv3_d234_e346_k357_w1.0` and `w1.2`, given
random non-trivial weights and BN statistics, saved in the published layout (`{"state_dict": ...}`)
and imported with `onceforall.supernet.official.import_official`. The imported supernet and the subnets we
extract must give the reference's logits exactly (max abs difference 0.0).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from onceforall.supernet import checkpoint as ckpt
from onceforall.supernet.bn import recalibrate_bn
from onceforall.supernet.efficiency import subnet_params
from onceforall.errors import UserError
from onceforall.specialization.export import load_supernet
from onceforall.supernet.official import import_official
from onceforall.supernet.space import get_space, imagenet_mbv3_space
from onceforall.supernet.supernet import OFASupernet
from official_ref import published_file, reference_net, stub_reference_loaders

WIDTHS = (1.0, 1.2)


_IMPORTED: dict[float, tuple] = {}


def _imported(width: float, tmp_path_factory) -> tuple:
    """(reference net, our imported supernet, its folder, the published-layout file), once per width."""
    if width not in _IMPORTED:
        tmp = tmp_path_factory.mktemp(f"official-w{width}")
        ref = reference_net(width)
        source = tmp / f"ofa_mbv3_d234_e346_k357_w{width}"
        published_file(ref, source)
        folder = import_official(source, tmp / "ours")
        _IMPORTED[width] = ref, load_supernet(folder), folder, source
    return _IMPORTED[width]


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda w: f"w{w}")
def imported(request, tmp_path_factory):
    return _imported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def imported_w10(tmp_path_factory):
    return _imported(1.0, tmp_path_factory)


def parity_cases(space, n_configs: int = 8, per_config: int = 3):
    """Max, min and random configs, each at ``per_config`` resolutions (224 among them)."""
    rng = np.random.default_rng(0)
    cfgs = [space.max_config(), space.min_config()] + space.sample_many(rng, n_configs - 2)
    cases = []
    for i, cfg in enumerate(cfgs):
        rs = [224] + list(rng.choice([r for r in space.resolutions if r != 224], per_config - 1,
                                     replace=False))
        cases += [(cfg, int(r)) for r in rs[:per_config]]
    return cases


def test_supernet_and_extracted_subnets_match_the_reference_bit_for_bit(imported):
    ref, net, _, _ = imported
    cases = parity_cases(net.space)
    assert len(cases) >= 24
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for cfg, r in cases:
            x = torch.randn(2, 3, r, r, generator=g)
            ref.set_active_subnet(ks=list(cfg.k), e=list(cfg.e), d=list(cfg.d))
            want = ref(x)
            assert want.abs().max() > 0.5  # the random weights give non-trivial logits
            got = net(x, cfg)
            assert (got - want).abs().max().item() == 0.0, ("supernet", cfg, r)
            want_sub = ref.get_active_subnet(preserve_weight=True).eval()(x)
            got_sub = net.get_active_subnet(cfg).eval()(x)
            assert (got_sub - want_sub).abs().max().item() == 0.0, ("extracted", cfg, r)


def test_without_the_reference_numerics_the_logits_differ(imported):
    """What SearchSpace.reference_numerics buys: our own pooled-feature forms round differently."""
    ref, net, _, _ = imported
    ours = OFASupernet(dataclasses.replace(net.space, reference_numerics=False)).eval()
    ours.load_state_dict(net.state_dict())
    cfg = net.space.max_config()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    ref.set_active_subnet(ks=list(cfg.k), e=list(cfg.e), d=list(cfg.d))
    with torch.no_grad():
        assert (ours(x, cfg) - ref(x)).abs().max().item() > 0.0


def test_import_derives_the_space_and_records_the_source(imported):
    ref, net, folder, source = imported
    space, meta = net.space, ckpt.read_meta(folder)
    width = 1.2 if space.stem_width == 24 else 1.0
    assert space == get_space(f"ofa-mbv3-w{width}")  # the preset of the published supernet
    assert meta["source"]["sha256"] == ckpt.sha256(source)
    assert meta["phase"] == "imported" and meta["bn_recalibration"] == "ours"
    assert not space.feature_mix_bias and space.reference_numerics
    paper = imagenet_mbv3_space()
    assert (space.depths, space.kernels, space.expands, space.resolutions) == (
        paper.depths, paper.kernels, paper.expands, paper.resolutions)
    if width == 1.2:
        assert [u.width for u in space.units] == [32, 48, 96, 136, 192]
        assert (space.final_expand_width, space.feature_width) == (1152, 1536)
    else:
        assert space.units == paper.units
    # Parameter counts (no feature-mix bias) equal the reference subnet's.
    for cfg in (space.max_config(), space.min_config()):
        ref.set_active_subnet(ks=list(cfg.k), e=list(cfg.e), d=list(cfg.d))
        ref_params = sum(p.numel() for p in ref.get_active_subnet(preserve_weight=False).parameters())
        assert subnet_params(space, cfg) == ref_params


def test_older_layouts_import_to_the_same_weights(imported, tmp_path):
    ref, _, folder, _ = imported
    want = ckpt.read_meta(folder)["files"][ckpt.WEIGHTS]
    state = ref.state_dict()
    older = {"module." + k.replace(".conv.", ".mobile_inverted_conv.", 1) if k.startswith("blocks.")
             else "module." + k: v for k, v in state.items()}
    assert any(".mobile_inverted_conv." in k for k in older)
    for name, payload in (("bare.pth", state), ("older.pth", older)):
        torch.save(payload, tmp_path / name)
        out = import_official(tmp_path / name, tmp_path / name.replace(".pth", ""))
        assert ckpt.read_meta(out)["files"][ckpt.WEIGHTS] == want, name


def test_reference_bn_recalibration_matches_set_running_statistics(imported):
    from ofa.imagenet_classification.elastic_nn.utils import set_running_statistics

    ref, _, folder, _ = imported
    ref, net = copy.deepcopy(ref), load_supernet(folder)  # the fixture's stay as imported
    space = net.space
    cfg = space.sample_many(np.random.default_rng(5), 1)[0]
    r = 160
    g = torch.Generator().manual_seed(2)
    images = torch.randn(10, 3, r, r, generator=g)  # batches of 4, 4, 2: weights by batch size
    untouched = net.units[0][0].expand_bn.running_mean.clone()
    ref.set_active_subnet(ks=list(cfg.k), e=list(cfg.e), d=list(cfg.d))
    set_running_statistics(ref, [(images[i:i + 4], None) for i in range(0, 10, 4)])
    recalibrate_bn(net, images, r, batch_size=4, forward=lambda x: net(x, cfg), semantics="reference")
    active = net.units[0][0].hidden(cfg.e[0])
    assert torch.equal(net.units[0][0].expand_bn.running_mean[active:], untouched[active:])
    x = torch.randn(2, 3, r, r, generator=g)
    with torch.no_grad():
        assert (net(x, cfg) - ref(x)).abs().max().item() == 0.0


def test_our_bn_recalibration_stays_the_default(imported):
    *_, folder, _ = imported
    fresh = load_supernet(folder)
    cfg = fresh.space.min_config()
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    recalibrate_bn(fresh, images, 128, forward=lambda x: fresh(x, cfg))
    bn = fresh.units[0][0].expand_bn
    hidden = fresh.units[0][0].hidden(cfg.e[0])
    # ours: the inactive channels are reset (the reference's semantics leave them as they were)
    assert torch.equal(bn.running_mean[hidden:], torch.zeros_like(bn.running_mean[hidden:]))
    assert torch.equal(bn.running_var[hidden:], torch.ones_like(bn.running_var[hidden:]))


# -- bad input: one line naming what is wrong and the fix -------------------------------------

def _error(source, tmp_path) -> str:
    with pytest.raises(UserError) as info:
        import_official(source, tmp_path / "out")
    line = info.value.line()
    assert "\n" not in line and "(fix: " in line
    return line


def test_a_resnet_state_dict_is_not_an_ofa_mbv3_supernet(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    assert "not an OFA MobileNetV3 supernet" in _error(tmp_path / "resnet.pth", tmp_path)
    torch.save({"epoch": 3, "lr": [0.1]}, tmp_path / "random.pth")
    assert "not a state dict" in _error(tmp_path / "random.pth", tmp_path)
    # e.g. a training checkpoint that also pickled its arguments
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "objects.pth")
    assert "weights-only" in _error(tmp_path / "objects.pth", tmp_path)


def test_a_static_subnet_is_not_a_supernet(imported_w10, tmp_path):
    ref = copy.deepcopy(imported_w10[0])
    ref.set_active_subnet(ks=7, e=6, d=4)
    torch.save(ref.get_active_subnet(preserve_weight=True).state_dict(), tmp_path / "subnet.pth")
    assert "has no place in it" in _error(tmp_path / "subnet.pth", tmp_path)


def test_a_truncated_file_is_named(imported_w10, tmp_path):
    *_, source = imported_w10
    data = source.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated or damaged" in _error(tmp_path / "cut.pth", tmp_path)


def test_a_width_that_does_not_fit_the_space(imported, tmp_path):
    ref, _, _, _ = imported
    state = dict(ref.state_dict())
    key = "blocks.5.conv.inverted_bottleneck.conv.conv.weight"  # expand ratio 4 at most
    state[key] = state[key][: state[key].shape[0] * 2 // 3]
    torch.save({"state_dict": state}, tmp_path / "narrow.pth")
    line = _error(tmp_path / "narrow.pth", tmp_path)
    assert "width does not fit the space" in line and "units.1.0.expand_conv.weight" in line


def test_cli_import_official_and_its_one_line_error(imported_w10, tmp_path):
    *_, source = imported_w10
    cmd = [sys.executable, "-m", "onceforall", "import-official"]
    done = subprocess.run(cmd + [str(source), "--out", str(tmp_path / "cli")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert ckpt.load_checkpoint(tmp_path / "cli").meta["source"]["sha256"] == ckpt.sha256(source)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    bad = subprocess.run(cmd + [str(tmp_path / "junk.pth"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# -- the published accuracy predictor and latency tables --------------------------------------

def reference_file(relative: str):
    """A module of the reference package loaded from its file: `ofa.tutorial`'s __init__ imports
    torchvision and tqdm for its ImageNet helpers, which the predictor's module does not need."""
    import importlib.util
    from pathlib import Path

    import ofa

    path = Path(ofa.__file__).parent / relative
    spec = importlib.util.spec_from_file_location(f"_reference_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tutorials_accuracy_predictor_imports_within_1e_4_points(imported, tmp_path):
    from onceforall.supernet.official_tables import PREDICTOR_RESOLUTIONS, import_accuracy_predictor
    from onceforall.specialization.predictor import AccuracyPredictor

    tutorial = reference_file("tutorial/accuracy_predictor.py")
    torch.manual_seed(7)
    ref = tutorial.AccuracyPredictor(pretrained=False, device="cpu")
    torch.save(ref.model.state_dict(), tmp_path / "acc_predictor.pth")
    space = imported[1].space
    space = space.restrict(resolutions=[r for r in space.resolutions if r in PREDICTOR_RESOLUTIONS])
    import_accuracy_predictor(tmp_path / "acc_predictor.pth", space, tmp_path / "predictor")
    ours = AccuracyPredictor.load(tmp_path / "predictor.json", space)
    cfgs = [space.max_config(), space.min_config()] + space.sample_many(np.random.default_rng(3), 200)
    population = [{"ks": list(c.k), "e": list(c.e), "d": list(c.d), "r": [c.r]} for c in cfgs]
    want = 100 * ref.predict_accuracy(population).numpy()[:, 0]
    got = ours.predict(cfgs)
    assert np.ptp(want) > 1e-3  # distinct architectures get distinct predictions
    assert np.abs(got - want).max() <= 1e-4
    with pytest.raises(UserError, match="no entry for resolutions"):
        import_accuracy_predictor(tmp_path / "acc_predictor.pth", imported[1].space, tmp_path / "p2")


def published_tables(space, resolutions, folder, rng) -> dict:
    """Lookup tables in the published YAML layout with a random mean for every key the space uses
    (and keys of other networks, which an import must ignore)."""
    import yaml

    from onceforall.supernet.official_tables import block_key, fixed_keys

    paths = {}
    for r in resolutions:
        keys = set(fixed_keys(space, r))
        keys |= {block_key(space, r, u, i, k, e) for u in range(len(space.units))
                 for i in range(space.max_depth) for k in space.kernels for e in space.expands}
        table = {key: {"count": 100, "mean": float(rng.uniform(0.001, 3.0)), "std": 0.01}
                 for key in sorted(keys)}
        table["Conv-input:999x999x3-output:500x500x8"] = {"count": 1, "mean": 1e6, "std": 0.0}
        paths[r] = folder / f"{r}_lookup_table.yaml"
        paths[r].write_text(yaml.safe_dump(table))
    return paths


def test_published_latency_tables_import_within_1e_9_ms(imported, tmp_path):
    from onceforall.specialization.latency import LatencyTable
    from onceforall.supernet.official_tables import import_latency_tables

    stub_reference_loaders()
    from ofa.nas.efficiency_predictor.latency_lookup_table import MBv3LatencyTable

    ref_net, net = imported[0], imported[1]
    resolutions = (160, 176, 192, 208, 224)  # the note10 tables of the tutorial
    space = net.space.restrict(resolutions=resolutions)
    paths = published_tables(space, resolutions, tmp_path, np.random.default_rng(11))
    out = import_latency_tables(paths, space, tmp_path / "note10.json", device="note10")
    table = LatencyTable.load(out, space)
    assert table.source["device"] == "note10" and "not measured here" in table.source["note"]
    import yaml

    reference = {}
    for r, path in paths.items():
        reference[r] = MBv3LatencyTable.__new__(MBv3LatencyTable)  # its __init__ downloads
        reference[r].lut = yaml.safe_load(path.read_text())
    cfgs = [space.max_config(), space.min_config()] + space.sample_many(np.random.default_rng(4), 10)
    for cfg in cfgs:
        ref_net.set_active_subnet(ks=list(cfg.k), e=list(cfg.e), d=list(cfg.d))
        want = reference[cfg.r].predict_network_latency(ref_net.get_active_subnet(False), cfg.r)
        assert abs(table.predict_one(cfg) - want) <= 1e-9, cfg
    del paths[176]
    with pytest.raises(UserError, match="no entry for resolutions \\[176\\]"):
        import_latency_tables(paths, space, tmp_path / "x.json", device="note10")


def test_search_on_imported_tables_says_the_latency_is_the_tables(imported_w10, tmp_path):
    """A search with both imported files: no measurement here (the table is the device's), and
    search.json carries the table's provenance for the card (export.py: card["latency_table"])."""
    import json

    from onceforall.supernet.official_tables import import_accuracy_predictor, import_latency_tables
    from onceforall.specialization.search import EvolutionConfig
    from onceforall.specialization.specialize import search_target
    from onceforall.specialization.targets import Target

    resolutions = (160, 176, 192, 208, 224)  # what both the predictor and the tables cover
    space = imported_w10[1].space.restrict(resolutions=resolutions)
    torch.manual_seed(0)
    ref = reference_file("tutorial/accuracy_predictor.py").AccuracyPredictor(pretrained=False, device="cpu")
    torch.save(ref.model.state_dict(), tmp_path / "acc.pth")
    predictor = import_accuracy_predictor(tmp_path / "acc.pth", space, tmp_path / "predictor")[1]
    tables = published_tables(space, resolutions, tmp_path, np.random.default_rng(0))
    table = import_latency_tables(tables, space, tmp_path / "phone.json", device="phone")
    target = Target.from_dict({"name": "phone", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
                               "constraint": {"kind": "latency_ms", "budget": 40.0}})
    result = search_target(space, target, predictor, tmp_path / "search", latency_path=table,
                           config=EvolutionConfig(population=20, generations=5))
    doc = json.loads((tmp_path / "search" / "search.json").read_text())
    assert doc["latency_source"]["device"] == "phone" and "verification" not in doc
    assert doc["predicted_latency_ms"] <= 40.0 and result.best.r in resolutions


def test_import_from_s3(imported_w10, s3_server, tmp_path):
    from onceforall.infra import store

    *_, folder, source = imported_w10
    uri = s3_server.bucket() + "/official/" + source.name
    store.upload_file(source, uri)
    out = import_official(uri, tmp_path / "from-s3")
    meta = ckpt.read_meta(out)
    assert meta["source"]["uri"] == uri and meta["source"]["sha256"] == ckpt.sha256(source)
    assert meta["files"] == ckpt.read_meta(folder)["files"]  # the same weights as from the file
