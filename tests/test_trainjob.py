"""The multi-node launcher (onceforall/training/trainjob.py) against a stand-in Kubernetes API server
(tests/trainjob_standin.py): a job that succeeds (two nodes on loopback, torchrun, gloo), one that
fails, one stuck Pending, one deleted under the launcher."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from safetensors.torch import load_file

from onceforall.supernet import checkpoint as ckpt
from onceforall.training import durable, trainjob
from onceforall.errors import UserError
from onceforall.training.launch import Launch, phase_spec
from onceforall.stages import setup
from onceforall.supernet.supernet import OFASupernet
from onceforall.training.train import run_phase
from trainjob_standin import UNSCHEDULABLE, StandIn

RBAC = Path(__file__).parents[1] / "manifests" / "base" / "rbac.yaml"
DATA, SPACE = "synthetic:600", "fashion-mnist"
FAST = trainjob.Follow(poll_s=0.2, log_join_s=10)
OWNER = {"name": "onceforall-abcde-1234567890", "uid": "5f0c8a8e-1d7e-4a43-9d0b-2f5b7f1c9e01"}
# One process adds a step's gradients subnet by subnet across both shares, the ranks add each share's
# and then all-reduce: the same addends in another order, so float32 rounding is the only difference.
# Measured: 5.8e-06 after the smoke kernel phase (8 steps, 2 cores), the weights moving up to 1e-2.
ATOL = 5e-5


@pytest.fixture
def standin(request, tmp_path):
    server = StandIn(request.param, tmp_path, sys.executable)
    yield server
    server.close()


def granted() -> set[tuple[str, str, str]]:
    """What manifests/base/rbac.yaml's Role grants on TrainJobs and pods."""
    role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "Role")
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"] if r in ("trainjobs", "pods", "pods/log")}


def _api(url: str):
    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


def _spec(tmp_path, phase="teacher", init=None, teacher=None, checkpoint_uri="durable"):
    return phase_spec(phase, tmp_path / "out", init=init, teacher=teacher, data=DATA, space=SPACE,
                      schedule="smoke", seed=0, device="cpu", progress=True,
                      checkpoint_uri=checkpoint_uri and str(tmp_path / checkpoint_uri))


def _run(server, spec, launch=Launch(nodes=2, image="ghcr.io/example/onceforall:test")):
    return trainjob.run(spec, launch, api_client=_api(server.url), namespace="ofa", owner=OWNER,
                        follow=FAST)


@pytest.mark.parametrize("standin", ["run"], indirect=True)
def test_two_nodes_on_loopback_train_like_one_process(standin, tmp_path, capfd):
    sp, sch, data = setup(SPACE, "smoke", DATA)
    run_phase(sp, sch, "teacher", data, tmp_path / "teacher", progress=False, device="cpu")
    # the kernel phase samples a random subnet at every step and distils from the teacher
    spec = _spec(tmp_path, "kernel", init=tmp_path / "teacher", teacher=tmp_path / "teacher")
    (tmp_path / "durable" / "trainjob" / "energy").mkdir(parents=True)
    (tmp_path / "durable" / "trainjob" / "energy" / "rank-7.json").write_text("{}")  # an earlier job's
    energy = _run(standin, spec)

    body = standin.created[0]
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["ownerReferences"][0]["uid"] == OWNER["uid"]
    assert body["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["numProcPerNode"] == 1
    assert standin.deleted == [body["metadata"]["name"]]  # deleted when done
    meta = ckpt.read_meta(tmp_path / "out")  # rank 0's output, copied back
    assert meta["completed"] and meta["world_size"] == 2
    a, b = meta["rank_checksums"]
    assert a == b
    assert durable.latest(spec["checkpoint_uri"], "kernel")["completed"]  # what a retry resumes from
    assert "epoch 1/1 val acc" in capfd.readouterr().out  # rank 0's log, streamed here
    assert standin.requests == granted()  # the Role grants exactly what a stage asks for
    # every rank metered itself (the launching pod's meter sees only that pod): this job's two
    assert [r["rank"] for r in energy] == [0, 1]
    assert all(r["duration_s"] > 0 and r["methods"]["cpu"] in ("model", "rapl", "none") for r in energy)

    # One process taking each global batch as the two ranks' shares (micro_batches=2) takes the
    # same steps: batch-norm statistics per share, dropout draws per share, as on two ranks.
    run_phase(sp, sch, "kernel", data, tmp_path / "one", init=tmp_path / "teacher",
              teacher=tmp_path / "teacher", progress=False, device="cpu", micro_batches=2)
    two, one = (load_file(str(d / ckpt.WEIGHTS)) for d in (tmp_path / "out", tmp_path / "one"))
    start = load_file(str(tmp_path / "teacher" / ckpt.WEIGHTS))
    params = [n for n, _ in OFASupernet(sp).named_parameters()]
    maxdiff = lambda a, b: max(float((a[n] - b[n]).abs().max()) for n in params)  # noqa: E731
    print(f"max |w_2nodes - w_1process|: {maxdiff(two, one):.3g}; moved by {maxdiff(two, start):.3g}")
    assert maxdiff(two, one) <= ATOL < maxdiff(two, start) / 50


@pytest.mark.parametrize("standin", ["fail"], indirect=True)
def test_a_failed_job_fails_the_stage_with_its_reason(standin, tmp_path):
    with pytest.raises(trainjob.TrainJobError, match="failed: FailedJobs: jobset failed"):
        _run(standin, _spec(tmp_path))
    assert len(standin.deleted) == 1


@pytest.mark.parametrize("standin", ["pending"], indirect=True)
def test_a_job_stuck_pending_fails_with_the_schedulers_reason(standin, tmp_path):
    launch = Launch(nodes=2, gpus_per_node=8, procs_per_node=8, image="x", pending_timeout_s=0.6)
    with pytest.raises(trainjob.TrainJobError, match="unscheduled for 0.6 s: .*Unschedulable: 0/3 nodes"):
        _run(standin, _spec(tmp_path), launch)
    assert UNSCHEDULABLE.startswith("0/3 nodes")
    assert standin.created[0]["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert len(standin.deleted) == 1


@pytest.mark.parametrize("standin", ["vanish"], indirect=True)
def test_a_job_deleted_under_the_launcher_fails_the_stage(standin, tmp_path):
    with pytest.raises(trainjob.TrainJobError, match="was deleted while the stage waited"):
        _run(standin, _spec(tmp_path))


@pytest.mark.parametrize("standin", ["pending", "fail"], indirect=True)
def test_a_retried_task_follows_its_running_job_or_replaces_its_finished_one(standin, tmp_path, capsys):
    """A task's next try (its pod killed before it deleted the job) finds the job by its name."""
    spec = trainjob.remote_spec(_spec(tmp_path))
    body = trainjob.trainjob_body(trainjob.job_name(spec), spec, Launch(nodes=2, image="x"), OWNER)
    jobs = client.CustomObjectsApi(_api(standin.url))
    trainjob.submit(jobs, "ofa", body)
    trainjob.submit(jobs, "ofa", body)
    assert len(standin.created) == 3 if standin.mode == "fail" else 2  # the second POST got 409
    assert list(standin.jobs) == [body["metadata"]["name"]]
    if standin.mode == "pending":  # still running: the second try follows it
        assert "following TrainJob" in capsys.readouterr().out and not standin.deleted
    else:  # finished: replaced by a new one
        assert standin.deleted == [body["metadata"]["name"]]


def test_many_nodes_need_durable_storage(tmp_path):
    with pytest.raises(UserError, match="durable storage") as e:
        trainjob.remote_spec(_spec(tmp_path, checkpoint_uri=None))
    assert e.value.field == "checkpoint_uri"
    command = trainjob.worker_command(_spec(tmp_path))
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    assert json.loads(command[-1])["phase"] == "teacher"
