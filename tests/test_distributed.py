"""Distributed training and evaluation on the CPU (gloo), launched by torchrun as on a cluster.

Every test starts real ``torchrun`` launchers (``.venv/bin/torchrun``) on a tiny shapes set
(64 px images, a shrunk ``shapes`` model, 4 steps), so the code under test is exactly the one a
student runs on GPUs: ``init_distributed`` from torchrun's environment, DDP, the sharded
aspect-ratio sampler, rank-0 checkpoints with every rank's states, the collective timeout and
the distributed evaluation. Workers use one thread each (``OMP_NUM_THREADS=1``), so two runs of
the same computation give the same bits.

* one launcher, two processes: the parameters stay bit-identical on both ranks, and the
  distributed evaluation equals a single-process one (results file, COCOeval stats, losses);
* two launchers of one process each (``--nnodes 2``, c10d rendezvous on 127.0.0.1, the
  multi-node path), through ``python -m mrcnn_edu.cli train --resume`` from the first run's
  step-2 checkpoint: the resumed run ends with the straight run's state, bit for bit;
* a rank that dies at step 2 makes the other exit with a message naming the cause, within a
  bounded time, instead of hanging; a rank that hangs is caught by the collective timeout.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mrcnn_edu.data.shapes import write_shapes_dataset
from mrcnn_edu.engine import distributed as dist_utils
from mrcnn_edu.engine.train import read_metrics_csv

TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT_S = 240  # a whole launch, start-up included (two busy cores)

#: The ``shapes`` recipe shrunk so a step takes about a second on a busy 2-core CPU.
TINY = [
    "model.transform.min_size=(64,)",
    "model.transform.max_size=64",
    "model.backbone.fpn_channels=32",
    "model.backbone.trainable_layers=1",
    "model.roi_heads.representation_size=64",
    "model.roi_heads.mask_layers=(32,)",
    "model.roi_heads.mask_dim_reduced=32",
    "model.roi_heads.batch_size_per_image=32",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "train.steps=4",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.warmup_steps=2",
]

#: What each rank runs (``python WORKER MODE DATA OUT KEY=VALUE ...`` under torchrun).
WORKER = r"""
import dataclasses, os, sys, time
import torch
from mrcnn_edu.engine import distributed as dist_utils
from mrcnn_edu.engine.train import read_metrics_csv
from mrcnn_edu.engine.evaluate import evaluate
from mrcnn_edu.engine.recipe import build_datasets, get_experiment, run_training

mode, data, out, *sets = sys.argv[1:]
if mode == "train":  # train, then evaluate distributed and (rank 0) single-process
    device = dist_utils.init_distributed("cpu")
    assert dist_utils.world_size() == 2, dist_utils.world_size()
    exp = get_experiment("shapes", dict(s.split("=", 1) for s in sets))
    model, result = run_training(exp, data, out, progress=False, device=device)
    r = dist_utils.rank()
    _, val = build_datasets(exp, data, train=False)
    res = evaluate(model, val, batch_size=2, progress=False,
                   results_file=f"{out}/dist_results.json")
    dump = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "history": result.history, "last_checkpoint": str(result.last_checkpoint),
            "dist_eval": dataclasses.asdict(res)}
    if r == 0:
        single = evaluate(model, val, batch_size=2, progress=False, distributed=False,
                          results_file=f"{out}/single_results.json")
        dump["single_eval"] = dataclasses.asdict(single)
    torch.save(dump, f"{out}/rank{r}.pt")
    dist_utils.cleanup()
else:  # "die" / "hang": rank 1 stops at its 2nd training step, inside the CLI's training
    import mrcnn_edu.model
    if os.environ["RANK"] == "1":
        forward, calls = mrcnn_edu.model.MaskRCNN.forward, [0]
        def stopping(self, *args, **kwargs):
            if self.training:
                calls[0] += 1
                if calls[0] == 2:
                    print(f"worker: rank 1 {mode}s at step 2", flush=True)
                    if mode == "die":
                        os._exit(17)
                    time.sleep(600)
            return forward(self, *args, **kwargs)
        mrcnn_edu.model.MaskRCNN.forward = stopping
    from mrcnn_edu.cli import main
    sys.exit(main(["train", "--preset", "shapes", "--data", data, "--out", out, "--no-progress",
                   *[f"--set={s}" for s in sets]]))
"""

#: ``local_main_first`` under torchrun (``python FIRST_WORKER OUT``): a slow "download" into a
#: shared cache that the second process can only read after the first has written it, then a
#: download that fails on the first process.
FIRST_WORKER = r"""
import sys, time
from pathlib import Path
from mrcnn_edu.engine import distributed as dist_utils

dist_utils.init_distributed("cpu")
out, r = Path(sys.argv[1]), dist_utils.rank()

def fetch():
    cache = out / "cache.txt"
    if dist_utils.local_rank() == 0:
        time.sleep(2.0)
        (out / "cache.tmp").write_text(f"weights from rank {r}")
        (out / "cache.tmp").replace(cache)
    return cache.read_text()  # FileNotFoundError on rank 1 had it not waited

print(f"rank {r} read: {dist_utils.local_main_first(fetch, 'fetch')}", flush=True)

def offline():
    if dist_utils.local_rank() == 0:
        raise FileNotFoundError("no network on this machine")
    raise AssertionError("rank 1 must not try after the first process failed")

try:
    dist_utils.local_main_first(offline, "offline")
except Exception as err:
    print(f"rank {r} raised {type(err).__name__}: {err}", flush=True)
dist_utils.cleanup()
"""


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "TORCHELASTIC_RUN_ID",
        )
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(TORCHRUN), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(
    procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT_S
) -> list[tuple[int, str]]:
    """Wait for every launcher (all of them killed, process group and all, at ``timeout``);
    return ``(exit status, output)`` of each."""
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        outputs = []
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            outputs.append(p.communicate()[0] or "")
        pytest.fail(
            f"torchrun launchers still running after {timeout} s:\n"
            + "\n----\n".join(o[-3000:] for o in outputs)
        )
    return done


def _two_nodes(module_or_script: list[str], cwd: Path, env: dict) -> list[subprocess.Popen]:
    """Two launchers of one process each that meet through the c10d rendezvous on 127.0.0.1,
    as two machines would (``--nnodes 2``). Launcher 0 hosts the rendezvous store
    (``is_host``); c10d gives out the ranks, so ``--node-rank`` is not needed (torchrun ignores
    it for c10d)."""
    port = _free_port()
    return [
        _start(
            [
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                f"test{port}",
                "--rdzv-conf",
                f"is_host={int(node == 0)}",
                *module_or_script,
            ],
            cwd,
            env,
        )
        for node in (0, 1)
    ]


def _same(a, b, where: str = "") -> None:
    """Exactly equal, NaN equal to NaN, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_shapes_dataset(root / "shapes", train=8, val=5, size=64, seed=0, progress=False)
    (root / "worker.py").write_text(WORKER)
    return root


@pytest.fixture(scope="module")
def straight(work) -> dict:
    """One launcher, two processes, 4 steps straight (checkpoints at 2 and 4), then evaluation."""
    out = work / "straight"
    [(code, log)] = _finish(
        [
            _start(
                [
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                    "worker.py",
                    "train",
                    "shapes",
                    str(out),
                    *TINY,
                ],
                work,
                _env(),
            )
        ]
    )
    assert code == 0, log[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"out": out, "ranks": ranks, "log": log}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_two_processes_keep_bit_identical_parameters(straight):
    r0, r1 = straight["ranks"]
    assert r0["state"].keys() == r1["state"].keys()
    for name, p in r0["state"].items():  # parameters, and buffers (rank 0's, copied at the end)
        assert torch.equal(p, r1["state"][name]), f"{name} differs between the ranks"
    # rank 0's checkpoint holds that model and every rank's random states
    ckpt = torch.load(straight["out"] / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    _same(ckpt["model"], r0["state"], "model")
    per_rank = ckpt["extra"]["ranks"]
    assert len(per_rank) == 2 and not torch.equal(
        per_rank[0]["rng"]["torch"], per_rank[1]["rng"]["torch"]
    )
    # training moved them, and both ranks logged the same all-reduced rows
    mid = torch.load(straight["out"] / "step_0000002.pt", weights_only=True)
    assert any(not torch.equal(mid["model"][n], p) for n, p in r0["state"].items())
    assert [row["step"] for row in r0["history"]] == [1, 2, 3, 4]
    _same(r0["history"][-1]["loss"], r1["history"][-1]["loss"])
    assert (
        r0["last_checkpoint"] == r1["last_checkpoint"] == str(straight["out"] / "step_0000004.pt")
    )
    # lr and warm-up scaled by the global batch (2) against the recipe's reference batch (4):
    # lr 5e-4 * 2/4, warm-up 2 * 4/2 = 4 steps (from 0.001 x), cosine to 0.02 x over 4 steps
    rows = read_metrics_csv(straight["out"] / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    want = [
        2.5e-4 * (0.001 * (1 - k / 4) + k / 4) * (0.02 + 0.98 * (1 + math.cos(math.pi * k / 4)) / 2)
        for k in range(4)
    ]
    assert [row["lr"] for row in rows] == pytest.approx(want, rel=1e-12)


def test_distributed_eval_equals_single_process_eval(straight):
    r0, r1 = straight["ranks"]
    dist_res, single = r0["dist_eval"], r0["single_eval"]
    assert single["num_images"] == 5 and single["num_detections"] > 0

    def comparable(res: dict) -> dict:  # without timings; the results files are compared below
        out = {k: v for k, v in res.items() if k not in ("images_per_second", "results_file")}
        out["summary_text"] = re.sub(r"t=\d+\.\d+s", "t=?", res["summary_text"])
        return out

    assert "segm" in single["metrics"] and single["val_losses"]
    _same(comparable(dist_res), comparable(single))
    _same(comparable(r1["dist_eval"]), comparable(dist_res))  # every rank returns the result
    out = straight["out"]
    assert (out / "dist_results.json").read_bytes() == (out / "single_results.json").read_bytes()


def test_multi_node_resume_continues_exactly(straight, work):
    """``--nnodes 2`` through the CLI, resumed from the straight run's step-2 checkpoint."""
    run = work / "resumed"
    run.mkdir()
    shutil.copy(straight["out"] / "step_0000002.pt", run / "last.pt")
    cli = [
        "-m",
        "mrcnn_edu.cli",
        "train",
        "--preset",
        "shapes",
        "--data",
        "shapes",
        "--out",
        str(run),
        "--resume",
        "--no-progress",
        *[f"--set={s}" for s in TINY],
    ]
    results = _finish(_two_nodes(cli, work, _env()))
    logs = "\n----\n".join(log[-4000:] for _, log in results)
    assert [code for code, _ in results] == [0, 0], logs
    assert logs.count("trained 2 steps") == 1, logs  # rank 0 alone prints
    want = torch.load(straight["out"] / "last.pt", weights_only=True)
    got = torch.load(run / "last.pt", weights_only=True)
    assert got["step"] == want["step"] == 4
    for part in ("model", "optimizer", "scheduler", "data_state"):
        _same(got[part], want[part], part)
    _same(got["extra"]["ranks"], want["extra"]["ranks"], "ranks")
    _same(got["model"], straight["ranks"][1]["state"], "model")  # rank 1 of the straight run


def test_a_dead_rank_stops_the_others_with_a_clear_message(work):
    run = work / "dies"
    start = time.monotonic()
    results = _finish(
        _two_nodes(["worker.py", "die", "shapes", str(run), *TINY], work, _env()),
        timeout=LAUNCH_TIMEOUT_S,
    )
    logs = [log for _, log in results]
    assert all(code != 0 for code, _ in results), logs
    alive = next(log for log in logs if "rank 1 dies at step 2" not in log)
    assert "lost contact with the other processes" in alive, alive[-4000:]
    assert "rank 0 of 2" in alive and "--resume" in alive, alive[-4000:]
    assert time.monotonic() - start < LAUNCH_TIMEOUT_S


@pytest.mark.slow
def test_a_hung_rank_is_caught_by_the_timeout(work):
    run = work / "hangs"
    [(code, log)] = _finish(
        [
            _start(
                [
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                    "worker.py",
                    "hang",
                    "shapes",
                    str(run),
                    *TINY,
                ],
                work,
                _env(**{dist_utils.TIMEOUT_ENV: "8"}),
            )
        ]
    )
    assert code != 0, log[-4000:]
    assert "rank 1 hangs at step 2" in log
    assert "lost contact" in log and "8 s timeout" in log, log[-4000:]


# ---------------------------------------------------------------------------------------------
# Without processes
# ---------------------------------------------------------------------------------------------


def test_each_machines_first_process_fetches_before_the_others(tmp_path):
    (tmp_path / "first.py").write_text(FIRST_WORKER)
    args = ["--standalone", "--nproc_per_node", "2", "first.py", str(tmp_path)]
    [(code, log)] = _finish([_start(args, tmp_path, _env())])
    assert code == 0, log[-4000:]
    for r in (0, 1):  # both read what rank 0 wrote; rank 1 waited for it
        assert f"rank {r} read: weights from rank 0" in log, log[-4000:]
    assert "rank 0 raised FileNotFoundError: no network on this machine" in log, log[-4000:]
    assert (
        "rank 1 raised RuntimeError: offline: the first process of a machine (LOCAL_RANK 0) "
        "failed" in log
    ), log[-4000:]
    assert "must not try" not in log


def test_helpers_without_a_process_group(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert dist_utils.init_distributed("cpu") == torch.device("cpu")
    assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main_process()) == (
        0,
        1,
        True,
    )
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist_utils.gather_object(3) == [3] and dist_utils.broadcast_object(4) == 4
    assert dist_utils.any_rank(True) and not dist_utils.any_rank(False)
    assert dist_utils.local_main_first(lambda: 7, "here") == 7
    assert dist_utils.all_reduce_mean([1, 2.5]) == [1.0, 2.5]
    model = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_model(model) is model
    assert dist_utils.rank_seed(5, 0) == 5 and dist_utils.rank_seed(5, 2) == 5 + 2 * 1_000_003
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="not initialised; call .*init_distributed"):
        dist_utils.require_initialized("run_training")
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        dist_utils.init_distributed("cpu")
    monkeypatch.setenv(dist_utils.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MRCNN_EDU_DIST_TIMEOUT must be a positive number"):
        dist_utils.timeout_seconds()


def test_comm_errors_are_recognised():
    gloo_dead = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
        "closed by peer [127.0.0.1]:34539"
    )
    gloo_late = RuntimeError(
        "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
        "5000ms for recv operation to complete"
    )
    assert dist_utils.is_comm_error(gloo_dead) and dist_utils.is_comm_error(gloo_late)
    assert not dist_utils.is_comm_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not dist_utils.is_comm_error(ValueError("Connection closed by peer"))
    err = dist_utils.peer_lost_error("train: step 7", gloo_dead)
    assert isinstance(err, dist_utils.DistributedError)
    assert str(err).startswith("train: step 7: rank 0 of 1 lost contact")


def test_sharded_sampler_deals_one_permutation_per_epoch(work):
    """The per-rank loaders of a 2-rank run, built without processes (``num_replicas``,
    ``rank_``): per-rank batches of global / 2, the shards together cover the data set, and
    ``set_epoch`` (through ``InfiniteLoader``) changes the order identically on every rank."""
    from mrcnn_edu.data.coco import shapes_dataset
    from mrcnn_edu.data.sampler import infinite

    ds = shapes_dataset(work / "shapes", "train")
    n = len(ds)
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        dist_utils.make_distributed_train_loader(ds, 3, num_replicas=2, rank_=0)
    orders = []
    for r in range(2):
        loader = dist_utils.make_distributed_train_loader(ds, 4, seed=7, num_replicas=2, rank_=r)
        assert loader.batch_sampler.batch_size == 2
        it = infinite(loader)
        ids = []
        while it.epoch < 2:  # two epochs; stop at the first batch of the third
            _, targets = next(it)
            if it.epoch < 2:
                ids.append((it.epoch, [int(t["image_id"]) for t in targets]))
        orders.append(ids)
    for epoch in (0, 1):
        shards = [[i for e, b in o if e == epoch for i in b] for o in orders]
        assert set(shards[0]) | set(shards[1]) == {int(i) for i in ds.ids}
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)  # padded to ceil(n / 2) each
    first = [b for e, b in orders[0] if e == 0]
    second = [b for e, b in orders[0] if e == 1]
    assert first != second  # set_epoch reshuffled
    # the permutation is DistributedSampler's: seed + epoch, rank r takes positions r::2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    perm += perm[: -(-n // 2) * 2 - n]  # DistributedSampler's padding
    assert sorted(i for b in first for i in b) == sorted(int(ds.ids[j]) for j in perm[0::2])
