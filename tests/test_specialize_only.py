"""Specialize-only runs (issue #23): a supernet URI instead of training, on streamed ImageNet-layout data.

The supernet of the end-to-end run is MIT's OFAMobileNetV3 w1.0 built by the reference package with
random weights and BN statistics (official_ref.py), saved in the published layout and imported by
`ofa import-official`; the unit tests of the data and the report use the `imagenet-mbv3` space with
random weights saved in our checkpoint format. The data: a few classes of JPEGs of mixed sizes
written by the test. The classifier keeps its 1,000 rows; the dataset's few classes slice it
(imagefolder.py), so random weights still score about one in three and the predictor has
something to fit.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from onceforall.infra import store
from onceforall.supernet import checkpoint as ckpt
from onceforall.supernet.checkpoint import WEIGHTS, save_checkpoint
from onceforall.data import (calibration_batches, calibration_images, eval_batches, head_rows, in_memory,
                             load_dataset, subsample)
from onceforall.errors import UserError
from onceforall.specialization.export import CARD, MODEL, load_supernet
from onceforall.data.imagefolder import (calibration_pixel_batches, eval_size, eval_transform,
                                         open_image_folder, pixel_batches)
from onceforall.supernet.official import import_official
from onceforall.supernet.space import get_space
from onceforall.stages import (REPORT_JSON, REPORT_MD, energy_summary, open_supernet, report_markdown,
                               supernet_space)
from onceforall.supernet.supernet import OFASupernet
from onceforall_pipelines.ofa_pipeline import COMPILED_SPECIALIZE, compile_pipeline
from official_ref import published_file, reference_net
from test_cluster import kfp_server  # noqa: F401 (the stand-in KFP API server, a fixture)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("n01440764", "n01443537", "n01484850")  # the first three of ImageNet's sorted wnids


def make_image_folder(root: Path, *, train: int = 10, val: int = 4, seed: int = 0) -> Path:
    """JPEGs of mixed sizes and aspect ratios in ImageNet's layout; each class its own hue."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(140, 320)), int(rng.integers(140, 320))
                base = np.zeros(3)
                base[c] = 180
                pixels = base + rng.normal(0, 40, (h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.JPEG",
                                                                           quality=90)
    return root


def random_supernet(folder: Path, space: str = "imagenet-mbv3", seed: int = 0) -> Path:
    sp = get_space(space)
    torch.manual_seed(seed)
    net = OFASupernet(sp)
    return save_checkpoint(folder, net.state_dict(), {"space": sp.to_dict(), "phase": "width-2",
                                                      "epoch": 0, "step": 0})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


# -- the data -----------------------------------------------------------------------------------

def test_splits_labels_and_nothing_held(folder):
    data = load_dataset(f"imagefolder:{folder}", val_size=6, seed=0)
    assert data.classes == CLASSES and data.head == (0, 1, 2) and data.channels == 3
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 12)
    # the held-out split comes from train/, the test split is val/
    assert all("/train/" in f for f in data.train.files + data.val.files)
    assert all("/val/" in f for f in data.test.files) and not set(data.train.files) & set(data.val.files)
    assert [int(y) for y in data.test.labels] == [0] * 4 + [1] * 4 + [2] * 4
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in vars(data.train).values())
    assert data.describe()["streamed"] and data.describe()["image_size"] is None
    # 1,000 rows, three classes: the head is sliced to rows 0-2; all 1,000 present: not sliced
    assert head_rows(data, 1000).tolist() == [0, 1, 2] and head_rows(data, 3) is None
    with pytest.raises(UserError, match="serves specialization only"):
        in_memory(data)


def test_images_are_read_on_demand(folder, monkeypatch):
    data = open_image_folder(f"imagefolder:{folder}", val_size=6, workers=0)
    reads = []
    real = store.read_bytes
    monkeypatch.setattr(store, "read_bytes", lambda uri: reads.append(uri) or real(uri))
    x, y = next(pixel_batches(data, "test", 128, batch_size=5))
    assert x.shape == (5, 3, 128, 128) and x.dtype == torch.uint8 and len(reads) == 5
    assert reads == list(data.test.files[:5])


def test_eval_transform_is_the_references(tmp_path):
    """Shorter side to ceil(r / 0.875) keeping the aspect ratio, then the centre r x r."""
    from PIL import Image

    assert [eval_size(r) for r in (128, 160, 224)] == [147, 183, 256]
    # a 400 x 300 image whose left and right halves differ; a marker column in the middle
    a = np.zeros((300, 400, 3), np.uint8)
    a[:, 200:] = 255
    img = Image.fromarray(a)
    out = eval_transform(img, 224)
    assert out.size == (224, 224)
    # resized to 341 x 256 (int(256 * 400 / 300) = 341), cropped at left round((341 - 224) / 2) = 58:
    # the edge at x = 200 * 341 / 400 = 170.5 of the resized image lands at 112.5 of the crop
    row = np.asarray(out)[112, :, 0].astype(int)
    assert row[:110].max() == 0 and row[115:].min() == 255
    # an image already at the resize size is only cropped
    b = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(eval_transform(Image.fromarray(b), 224)), b[16:240, 16:240])


def test_calibration_is_training_images_seeded_per_resolution(folder):
    data = open_image_folder(f"imagefolder:{folder}", val_size=6, workers=0)
    a = torch.cat(list(calibration_pixel_batches(data, 8, seed=3, resolution=144, batch_size=4)))
    b = torch.cat(list(calibration_pixel_batches(data, 8, seed=3, resolution=144, batch_size=8)))
    c = torch.cat(list(calibration_pixel_batches(data, 8, seed=4, resolution=144)))
    assert a.shape == (8, 3, 144, 144) and torch.equal(a, b) and not torch.equal(a, c)
    # random-resized crops, not the evaluation view of the same images
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(3))[:8]
    same = dataclasses.replace(data, val=data.train.subset(idx))
    evaluated = torch.cat([x for x, _ in pixel_batches(same, "val", 144)])
    assert not torch.equal(a, evaluated)
    # normalized with ImageNet's mean and std, at the resolution asked for
    x = torch.cat(list(calibration_batches(data, 8, 3, 160)))
    assert x.shape == (8, 3, 160, 160) and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(eval_batches(data, "val", 128))
    assert x.shape[1:] == (3, 128, 128) and -2.2 < float(x.min()) and float(x.max()) < 2.7


def test_classes_file_names_the_heads_rows(tmp_path):
    root = make_image_folder(tmp_path / "subset", train=2, val=1)
    (root / "classes.txt").write_text("n00000001\n" + "\n".join(CLASSES) + "\n")
    data = open_image_folder(f"imagefolder:{root}", workers=0)
    assert data.classes == CLASSES and data.head == (1, 2, 3)
    (root / "classes.txt").write_text("n01440764\n")
    with pytest.raises(UserError, match="not in classes.txt"):
        open_image_folder(f"imagefolder:{root}", workers=0)


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "x" / "train" / "a").mkdir(parents=True)
    (tmp_path / "x" / "train" / "a" / "1.JPEG").write_bytes(b"not a jpeg")
    (tmp_path / "x" / "val" / "a").mkdir(parents=True)
    (tmp_path / "x" / "val" / "a" / "1.JPEG").write_bytes(b"not a jpeg")
    data = open_image_folder(f"imagefolder:{tmp_path / 'x'}", workers=0)
    with pytest.raises(UserError, match="cannot read image"):
        next(pixel_batches(data, "test", 128))


def test_streamed_from_s3_as_from_the_folder(s3_server, folder, tmp_path):
    bucket = s3_server.bucket()
    store.publish_dir(folder, f"{bucket}/imagenet")
    local = open_image_folder(f"imagefolder:{folder}", val_size=6, workers=0)
    remote = open_image_folder(f"imagefolder:{bucket}/imagenet", val_size=6, workers=1)
    assert remote.classes == local.classes and torch.equal(remote.test.labels, local.test.labels)
    assert remote.test.files[0].startswith("s3://")
    x_local = torch.cat([x for x, _ in pixel_batches(local, "test", 128, batch_size=6)])
    x_remote = torch.cat([x for x, _ in pixel_batches(remote, "test", 128, batch_size=6)])  # 1 worker
    assert torch.equal(x_local, x_remote)

    sn = random_supernet(tmp_path / "sn", "fashion-mnist")
    store.publish_dir(sn, f"{bucket}/supernets/sn")
    record = open_supernet(f"{bucket}/supernets/sn", tmp_path / "opened")
    assert (tmp_path / "opened" / WEIGHTS).read_bytes() == (sn / WEIGHTS).read_bytes()
    assert record["space"]["name"] == "fashion-mnist" and record["source"]["uri"].startswith("s3://")


# -- the supernet and the report --------------------------------------------------------------------

def test_open_supernet_verifies_and_hands_on_its_space(tmp_path):
    sn = random_supernet(tmp_path / "sn", "fashion-mnist")
    record = open_supernet(str(sn), tmp_path / "out")
    space = supernet_space(str(sn))
    assert get_space(space.to_spec()) == space == get_space("fashion-mnist")
    assert get_space("json:" + json.dumps(record["space"])) == space
    assert record["metrics"]["parameters"] > 0 and record["stage"] == "open-supernet"
    raw = bytearray((sn / WEIGHTS).read_bytes())
    raw[-1] ^= 1
    (sn / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(UserError, match="sha256"):
        open_supernet(str(sn), tmp_path / "out2")
    with pytest.raises(UserError, match="checkpoint.json is missing"):
        supernet_space(str(tmp_path))


def _record(stage, target=None, j=10.0):
    return {"stage": stage, "target": target, "wall_s": 1.0, "metrics": {},
            "energy": {"cpu_j": j, "gpu_j": 0.0, "ram_j": 0.0, "total_j": j, "emissions_g": j / 1e3,
                       "methods": {"cpu": "model"}}}


def test_report_of_a_run_without_training_says_so():
    opened = {**_record("open-supernet"), "source": {"uri": "s3://b/ofa-mbv3-w12"}}
    ledger = [opened, _record("fit-accuracy-predictor"), _record("search", "a"), _record("export", "a")]
    e = energy_summary(ledger)
    assert "savings" not in e and e["training"]["in_run"] is False
    assert e["shared_j"] == 20.0 and e["training"]["supernet"] == "s3://b/ofa-mbv3-w12"
    text = report_markdown({"run_id": "r", "targets": {}, "stages": ledger, "energy": e})
    assert "Specialize-only run of the supernet `s3://b/ofa-mbv3-w12`" in text and "from-scratch" in text
    # a run that trained has no such note
    assert "training" not in energy_summary([_record("train-teacher"), _record("search", "a")])


def test_committed_specialize_pipeline_is_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml", specialize=True)
    assert fresh.read_text() == COMPILED_SPECIALIZE.read_text(), \
        "pipelines/onceforall-specialize.yaml is stale: run `make compile` and commit it"
    spec = next(yaml.safe_load_all(COMPILED_SPECIALIZE.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert "open-supernet" in tasks and not any(t.startswith(("train-", "shrink")) for t in tasks)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"supernet", "data", "targets"}


# -- BN semantics: the supernet's own, in every stage that recalibrates ------------------------------

@pytest.fixture(scope="module")
def official_source(tmp_path_factory):
    """MIT's OFAMobileNetV3 w1.0 with random weights, in the published layout."""
    return published_file(reference_net(1.0, seed=1), tmp_path_factory.mktemp("official") / "w1.0.pth")


def test_the_sidecars_bn_semantics_travel_with_the_supernet(official_source, tmp_path):
    assert load_supernet(import_official(official_source, tmp_path / "ref", bn="reference")).bn_semantics \
        == "reference"
    assert load_supernet(import_official(official_source, tmp_path / "ours")).bn_semantics == "ours"
    own = random_supernet(tmp_path / "own", "fashion-mnist")  # trained here: no bn_recalibration
    assert "bn_recalibration" not in ckpt.read_meta(own) and load_supernet(own).bn_semantics == "ours"
    meta = json.loads((own / ckpt.SIDECAR).read_text())
    (own / ckpt.SIDECAR).write_text(json.dumps({**meta, "bn_recalibration": "biased"}))
    with pytest.raises(UserError, match="bn_recalibration"):
        load_supernet(own)


def _semantics_seen(monkeypatch, *modules) -> list:
    """The ``semantics`` each recalibration in ``modules`` asks for (the real recalibration runs)."""
    from onceforall.supernet import bn

    seen = []
    for module in modules:
        for name in ("recalibrate_bn", "recalibrate_bn_batches"):
            if hasattr(module, name):
                def spy(*args, semantics="ours", real=getattr(bn, name), **kw):
                    seen.append((real.__name__, semantics))
                    return real(*args, semantics=semantics, **kw)

                monkeypatch.setattr(module, name, spy)
    return seen


def test_accuracy_data_and_evaluation_recalibrate_as_the_supernet_says(official_source, folder, tmp_path,
                                                                      monkeypatch):
    from onceforall.specialization import accuracy_data
    from onceforall.supernet import evaluate

    seen = _semantics_seen(monkeypatch, accuracy_data, evaluate)
    net = load_supernet(import_official(official_source, tmp_path / "ref", bn="reference"))
    data = subsample(open_image_folder(f"imagefolder:{folder}", val_size=3, workers=0), None, 3)
    cfg = net.space.min_config()
    accuracy_data.SubnetEvaluator(net, data, calib_images=4, mirror=False).correct(cfg)
    evaluate.evaluate_subnets(net, {"min": cfg}, data, None)
    assert seen == [("recalibrate_bn_batches", "reference")] * 2
    # our own supernets (no bn_recalibration in the sidecar): ours, held in memory or streamed
    seen.clear()
    own = load_supernet(random_supernet(tmp_path / "own", "fashion-mnist"))
    fm = load_dataset("synthetic:60", val_size=12)
    fm_cfg = own.space.min_config()
    accuracy_data.SubnetEvaluator(own, fm, calib_images=8, mirror=False).correct(fm_cfg)
    evaluate.evaluate_subnets(own, {"min": fm_cfg}, fm, calibration_images(fm, 8, 0))
    assert seen == [("recalibrate_bn", "ours")] * 2


@pytest.fixture(scope="module")
def exported(official_source, folder, tmp_path_factory):
    """The min subnet of an official supernet imported with the reference's BN semantics, exported on
    the JPEG folder: (supernet folder, model folder, card)."""
    from onceforall.specialization.export import export_subnet
    from onceforall.specialization.targets import Target

    tmp = tmp_path_factory.mktemp("exported")
    supernet = import_official(official_source, tmp / "ref", bn="reference")
    net = load_supernet(supernet)
    data = open_image_folder(f"imagefolder:{folder}", val_size=3, workers=0)
    target = Target.from_dict({"name": "t", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
                               "constraint": {"kind": "params", "budget": 1e9}})
    card = export_subnet(supernet, net.space.min_config(), data, target, tmp / "model", seed=2,
                         calib_images=8)
    return supernet, tmp / "model", card


def test_export_recalibrates_with_the_reference_semantics_of_an_imported_supernet(exported, folder):
    """The exported graph is the subnet recalibrated as the reference's set_running_statistics
    would, on the same calibration images: not as ours would."""
    import onnxruntime as ort

    from onceforall.supernet.bn import recalibrate_bn_batches
    from onceforall.specialization.export import DeployModel

    supernet, model_dir, card = exported
    assert card["bn_recalibration"]["semantics"] == "reference"
    data = open_image_folder(f"imagefolder:{folder}", val_size=3, workers=0)
    cfg = load_supernet(supernet).space.min_config()
    pixels = torch.cat([x for x, _ in pixel_batches(data, "test", cfg.r)]).float() / 255.0
    sess = ort.InferenceSession(str(model_dir / MODEL), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: pixels.numpy()})[0])

    def deployed(semantics: str) -> torch.Tensor:
        subnet = load_supernet(supernet).get_active_subnet(cfg)
        recalibrate_bn_batches(subnet, calibration_batches(data, 8, 2, cfg.r), semantics=semantics)
        model = DeployModel(subnet.eval(), data.mean, data.std, cfg.r, cfg.r, head_rows(data, 1000)).eval()
        with torch.no_grad():
            return model(pixels)

    want, ours = deployed("reference"), deployed("ours")
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - ours).abs().max() > 1e-2 * ours.abs().max()


def test_reproduce_a_card_made_from_a_folder_of_jpegs(exported, folder, tmp_path):
    """onceforall.reproduce reads the card's image folder (its val/) with the card's preprocessing,
    without torch or the library's data code, and gets the card's accuracy on the same images."""
    from onceforall.reproduce import card_test_batches, reproduce

    _, model_dir, card = exported
    rep = reproduce(model_dir / CARD, repeats=3)  # the card's own folder: it is local
    assert rep["sha256_ok"] and rep["test_images"] == card["dataset"]["images"] == 12
    assert rep["test_acc"] == card["accuracy"]["test_top1_pct_onnxruntime"]
    # the pixels are the library's evaluation transform's, at the card's resolution
    r = card["resolution"]
    data = open_image_folder(f"imagefolder:{folder}", val_size=3, workers=0)
    (x, y), = list(card_test_batches(card, folder))
    want, labels = zip(*pixel_batches(data, "test", r))
    assert np.array_equal(x, torch.cat(want).numpy() / np.float32(255.0))
    assert np.array_equal(y, torch.cat(labels).numpy())
    # a class the model does not know; data that is not here
    (folder_copy := tmp_path / "copy" / "val" / "n99999999").mkdir(parents=True)
    (folder_copy / "x.JPEG").write_bytes((Path(data.test.files[0])).read_bytes())
    with pytest.raises(ValueError, match="n99999999"):
        next(card_test_batches(card, tmp_path / "copy"))
    remote = {**card, "dataset": {**card["dataset"], "source": "imagefolder:s3://b/imagenet"}}
    with pytest.raises(FileNotFoundError, match="pass the folder as --data"):
        card_test_batches(remote, None)


# -- end to end -------------------------------------------------------------------------------------

TARGETS = {"targets": [
    {"name": "phone-macs", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
     "constraint": {"kind": "macs", "budget": 150e6}},
    {"name": "mcu-params", "runtime": "onnxruntime", "threads": 1, "batch_size": 1,
     "constraint": {"kind": "params", "budget": 4.0e6}}]}


def import_official_cli(tmp_path: Path, *, bn: str) -> Path:
    """MIT's OFAMobileNetV3 w1.0 (the reference package) with random weights and BN statistics, saved
    as MIT publishes it, imported by `ofa import-official`: the folder it writes."""
    source = published_file(reference_net(1.0, seed=3), tmp_path / "ofa_mbv3_d234_e346_k357_w1.0")
    out = tmp_path / "supernet"
    proc = subprocess.run([sys.executable, "-m", "onceforall", "import-official", str(source),
                           "--out", str(out), "--bn", bn], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["bn_recalibration"] == bn
    return out


@pytest.mark.slow
def test_ofa_run_supernet_end_to_end(tmp_path, folder):
    """From MIT's published supernet layout (random weights) through `ofa import-official` and
    `ofa run --supernet` (kfp.local) on a folder of JPEGs to published ONNX models with cards and a
    report that says no training ran. Imported with the reference's BN semantics: every stage that
    recalibrates uses them, and the cards say so."""
    sn = import_official_cli(tmp_path, bn="reference")
    targets = tmp_path / "targets.yaml"
    targets.write_text(yaml.safe_dump(TARGETS))
    out, root = tmp_path / "published", tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "onceforall", "run", "--supernet", str(sn),
                           "--data", f"imagefolder:{folder}", "--schedule", "smoke",
                           "--targets", str(targets), "--out", str(out), "--pipeline-root", str(root),
                           "--runner", "subprocess"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = {line.split("Executing task '")[1].split("'")[0] for line in proc.stderr.splitlines()
               if "Executing task '" in line}
    shared = {"open-supernet", "fit-accuracy-predictor", "report-specialized"}
    assert shared | {"supernet-space", "profile-target", "search", "export", "stage-model"} <= started
    assert not [t for t in started if t.startswith(("train-", "shrink"))]
    for t in TARGETS["targets"]:
        card = json.loads((out / "models" / t["name"] / CARD).read_text())
        assert (out / "models" / t["name"] / MODEL).is_file()
        assert card["space"] == "ofa-mbv3-w1.0" and card["output"]["classes"] == list(CLASSES)
        assert card["bn_recalibration"]["semantics"] == "reference"
        r = card["resolution"]
        assert card["output"]["shape"] == ["batch", 3] and card["input"]["shape"] == ["batch", 3, r, r]
        assert card["input"]["preprocessing"]["resize_shorter_side_to"] == eval_size(card["resolution"])
        assert card["dataset"]["source"] == f"imagefolder:{folder}" and card["dataset"]["images"] == 12
        assert card["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
        assert card["accuracy"]["test_top1_pct_onnxruntime"] == card["accuracy"]["test_top1_pct_torch"]
        assert card[t["constraint"]["kind"]] <= t["constraint"]["budget"]
        assert "open-supernet" in card["energy"]["stages"]
    doc = json.loads((out / REPORT_JSON).read_text())
    assert set(doc["targets"]) == {"phone-macs", "mcu-params"} and "savings" not in doc["energy"]
    assert doc["energy"]["training"]["supernet"] == str(sn)
    assert "Specialize-only run" in (out / REPORT_MD).read_text()


def test_ofa_submit_supernet_uploads_the_specialize_pipeline(kfp_server, capsys):  # noqa: F811
    """`ofa submit --supernet` compiles and uploads the specialize-only pipeline under a name of its
    own, with the supernet and the streamed data as run parameters."""
    from test_cluster import API

    from onceforall.cli import main

    args = ["submit", "--host", kfp_server.url, "--supernet", "s3://b/supernets/ofa-mbv3-w1.0",
            "--data", "imagefolder:s3://b/imagenet"]
    assert main(args) == 0, capsys.readouterr().err
    (up,) = kfp_server.calls("POST", f"{API}/pipelines/upload")
    assert up.query["name"] == "onceforall-specialize"
    spec = next(yaml.safe_load_all(up.files["uploadfile"][1]))
    assert "open-supernet" in spec["root"]["dag"]["tasks"]
    (run,) = kfp_server.calls("POST", f"{API}/runs")
    assert run.json["runtime_config"]["parameters"] == {"supernet": "s3://b/supernets/ofa-mbv3-w1.0",
                                                        "data": "imagefolder:s3://b/imagenet"}
    assert main([*args, "--space", "imagenet-mbv3"]) == 2
    assert "leave out --space" in capsys.readouterr().err


def test_run_inputs_on_streamed_data_are_checked_before_it_starts(folder, tmp_path):
    from onceforall_pipelines.local import check_inputs

    # a training run takes streamed data (tests/test_stream.py runs one), but not fewer images
    # than one batch of its schedule
    with pytest.raises(UserError, match="fewer than one batch of 64"):
        check_inputs("imagenet-mbv3", "smoke", f"imagefolder:{folder}", None)
    sn = random_supernet(tmp_path / "sn", "fashion-mnist")  # 1 channel: the JPEGs have 3
    with pytest.raises(UserError, match="channel"):
        check_inputs("", "smoke", f"imagefolder:{folder}", None, supernet=str(sn))
    assert len(check_inputs("", "smoke", f"imagefolder:{folder}", None,
                            supernet=str(random_supernet(tmp_path / "in", "imagenet-mbv3")))) == 4


def test_container_run_mounts_the_supernet_and_the_data_read_only(folder, tmp_path):
    """`ofa run --supernet DIR --data imagefolder:DIR --runner container`: what the containers see
    (computed, no container started)."""
    from onceforall_pipelines.local import container_mounts

    root, out = tmp_path / "root", tmp_path / "published"
    sn = random_supernet(tmp_path / "sn", "fashion-mnist")
    root.mkdir()
    out.mkdir()
    writes, mounts = container_mounts(root, str(out), [f"imagefolder:{folder}", str(sn)])
    assert writes == [root, out]
    assert mounts == [(root, False), (out, False), (folder, True), (sn, True)]
    # from S3 nothing is mounted but the root; a folder under the root, or named twice, once
    inside = random_supernet(root / "supernet", "fashion-mnist")
    writes, mounts = container_mounts(root, "s3://b/out", ["imagefolder:s3://b/imagenet", "s3://b/sn"])
    assert writes == [root] and mounts == [(root, False)]
    _, mounts = container_mounts(root, str(out), [str(sn), str(sn), str(inside), str(tmp_path / "nope")])
    assert mounts == [(root, False), (out, False), (sn, True)]


def test_ofa_evaluate_on_streamed_data(folder, tmp_path, capsys):
    from onceforall.cli import main

    sn = random_supernet(tmp_path / "sn")
    config = json.dumps(get_space("imagenet-mbv3").min_config().to_dict())
    assert main(["evaluate", "--checkpoint", str(sn), "--data", f"imagefolder:{folder}",
                 "--config", config]) == 0
    acc = json.loads(capsys.readouterr().out)["config"]
    assert 0.0 <= acc <= 100.0 and acc * 12 / 100 == pytest.approx(round(acc * 12 / 100), abs=0.01)
