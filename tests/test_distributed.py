"""Data-parallel training: ``mpiexec -n 2 mnn train`` against one process, and what happens when ranks stop.

These launch real MPI jobs (MPICH's ``mpiexec`` from the test extra, beside this Python).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from mnn import cli, distributed
from mnn.checkpoint import read_checkpoint
from mnn.distributed import ONE_PROCESS, MpiRanks, OneProcess
from mnn.runs import CHECKPOINT
from mnn.train import TrainConfig, Trainer

MPIEXEC = Path(sys.executable).parent / "mpiexec"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MNN = [sys.executable, "-m", "mnn", "train"]
MLP = ["--limit", "2000", "--batch-size", "100", "--hidden", "32", "--quiet"]
CNN = ["--model", "cnn", "--limit", "400", "--batch-size", "50", "--channels", "2,3", "--hidden", "8", "--dropout",
       "0", "--quiet"]
GPT = ["--model", "gpt", "--batch-size", "4", "--layers", "1", "--heads", "2", "--width", "16", "--context", "8",
       "--quiet"]
LSTM = ["--model", "lstm", "--batch-size", "4", "--width", "8", "--hidden", "16", "--context", "8", "--dropout", "0",
        "--quiet"]
# rank 1 of an MPMD job: mnn train with one step replaced, to fail as a real run can
FAILING_RANK = """
import os, sys
from mnn import cli, train
train_step = train.Trainer.train_step
def failing_step(self, bar):
    if self.step == 15:
        {failure}
    train_step(self, bar)
train.Trainer.train_step = failing_step
sys.argv = ["mnn", *sys.argv[1:]]
cli.run_command()
"""


def mpiexec(ranks, args, timeout=120, **kwargs):
    assert MPIEXEC.exists(), f"{MPIEXEC} missing: install the test extra (pip install -e '.[test]')"
    return subprocess.run([str(MPIEXEC), "-n", str(ranks), *MNN, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kwargs)


def weights(run):
    tensors, meta = read_checkpoint(Path(run) / CHECKPOINT)
    return {name: value for name, value in tensors.items() if not name.startswith("optim/")}, meta


def relative_difference(a, b):
    """||a - b|| / ||a|| over every parameter and buffer of two checkpoints together."""
    names = sorted(a)
    assert names == sorted(b)
    difference = numpy.sqrt(sum(float(((a[n] - b[n]).astype(numpy.float64) ** 2).sum()) for n in names))
    return difference / numpy.sqrt(sum(float((a[n].astype(numpy.float64) ** 2).sum()) for n in names))


@pytest.mark.parametrize("flags", [MLP + ["--dropout", "0", "--optimizer", "sgd"], CNN, GPT, LSTM],
                         ids=["mlp-sgd", "cnn", "gpt", "lstm"])
def test_two_ranks_train_as_one_process(tmp_path, flags):
    """The global batch, split in two and all-reduced, gives one process's weights (float32 rounding);
    the CNN needs its batch norm synchronised for that. SGD's step is the gradient's size: ranks that summed
    their gradients rather than averaging them would differ there (AdamW's step hardly changes)."""
    flags = [*flags, "--steps", "20", "--eval-every", "10"]
    assert cli.main(["train", *flags, "--out", str(tmp_path / "one")]) == 0
    result = mpiexec(2, [*flags, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr
    (one, one_meta), (two, two_meta) = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert relative_difference(one, two) <= 1e-5
    assert len(one_meta["metrics"]) == len(two_meta["metrics"]) == 2
    for a, b in zip(one_meta["metrics"], two_meta["metrics"]):  # evaluation split over the ranks, then summed
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) <= 1e-5
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5


def test_rank_zero_alone_talks_and_writes(tmp_path):
    result = mpiexec(2, [*MLP, "--steps", "20", "--eval-every", "10", "--out", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("training mlp on fashion-mnist on 2 ranks") == 1
    assert result.stdout.count("step 10 ") == 1 and result.stdout.count("step 20 ") == 1


class SecondRank(OneProcess):
    """Rank 1 of a job, as the trainer sees it (collective operations as for one process)."""

    rank, is_root = 1, False


def test_a_rank_other_than_zero_writes_nothing(tmp_path, capsys):
    config = TrainConfig(limit=400, batch_size=50, steps=4, eval_every=2, model_kwargs={"hidden": [8]})
    trainer = Trainer(config, tmp_path / "run", quiet=False, ranks=SecondRank())
    trainer.run()
    trainer.request_stop(signal.SIGINT, None)
    assert not (tmp_path / "run").exists()
    assert len(trainer.metrics) == 2 and capsys.readouterr().out == ""


def ranks_of(size):
    ranks = []
    for rank in range(size):
        fake = MpiRanks.__new__(MpiRanks)
        fake.rank, fake.size = rank, size
        ranks.append(fake)
    return ranks


@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_ranks_shares_make_up_the_global_batch(size):
    config = TrainConfig(limit=400, batch_size=12, steps=4)
    task = Trainer(config, "unused").task
    whole_x, whole_y = task.batch(3)
    shares = [task.batch(3, ranks.share(12)) for ranks in ranks_of(size)]
    numpy.testing.assert_array_equal(numpy.concatenate([x for x, _ in shares]), whole_x)
    numpy.testing.assert_array_equal(numpy.concatenate([y for _, y in shares]), whole_y)
    assert ONE_PROCESS.share(12) == slice(None)


def test_a_batch_the_ranks_cannot_share_equally_is_refused():
    with pytest.raises(ValueError, match="--batch-size 101 is the global batch, shared equally by 2 ranks"):
        ranks_of(2)[1].share(101)
    result = mpiexec(2, [*MLP, "--batch-size", "101", "--steps", "4"], timeout=60)
    assert result.returncode != 0 and result.stderr.count("give a multiple of 2") == 1  # told once, by rank 0


@pytest.mark.parametrize("variable", distributed.WORLD_SIZE_VARIABLES)
def test_each_launchers_variable_gives_the_world_size(monkeypatch, variable):
    for name in distributed.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1
    monkeypatch.setenv(variable, "3")
    assert distributed.world_size() == 3


def test_an_mpi_library_that_does_not_see_the_launchers_ranks_is_refused(tmp_path):
    # MVAPICH's variable says 3 ranks; MPICH's singleton start sees this process alone
    env = {**ENV, "MV2_COMM_WORLD_SIZE": "3"}
    result = subprocess.run([*MNN, *MLP, "--steps", "1", "--out", str(tmp_path / "run")], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "the launcher started 3 ranks, but mpi4py's MPI library sees 1" in result.stderr


def wait_for(path, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_ends_every_rank_and_the_run_resumes_bit_for_bit(tmp_path, stop):
    """Ctrl-C or SIGTERM to mpiexec. With dropout: each rank's masks depend on (seed, step, rank), so a
    resumed run on the same number of ranks is the uninterrupted one exactly."""
    flags = [*MLP, "--dropout", "0.2", "--steps", "300", "--eval-every", "10"]
    assert mpiexec(2, [*flags, "--out", str(tmp_path / "whole")]).returncode == 0
    job = subprocess.Popen([str(MPIEXEC), "-n", "2", *MNN, *flags, "--out", str(tmp_path / "stopped")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(tmp_path / "stopped" / CHECKPOINT)
    job.send_signal(stop)  # mpiexec passes it to every rank
    out, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    step = weights(tmp_path / "stopped")[1]["step"]
    assert 10 <= step < 300 and out.count(f"interrupted: checkpoint saved at step {step}") == 1
    assert mpiexec(2, ["--resume", str(tmp_path / "stopped"), "--quiet"]).returncode == 0
    resumed, whole = weights(tmp_path / "stopped")[0], weights(tmp_path / "whole")[0]
    for name in whole:
        numpy.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_a_run_saved_by_two_ranks_resumes_on_one(tmp_path):
    flags = [*MLP, "--dropout", "0", "--steps", "20", "--eval-every", "10"]
    assert mpiexec(2, [*flags, "--out", str(tmp_path / "two")]).returncode == 0
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    assert mpiexec(2, ["--resume", str(tmp_path / "two"), "--steps", "40", "--quiet"]).returncode == 0
    assert cli.main(["train", "--resume", str(tmp_path / "one"), "--steps", "40", "--quiet"]) == 0
    assert relative_difference(weights(tmp_path / "one")[0], weights(tmp_path / "two")[0]) <= 1e-5


def failing_job(tmp_path, failure):
    flags = [*MLP, "--steps", "1000", "--eval-every", "10", "--out", str(tmp_path / "run")]
    rank_one = [sys.executable, "-c", FAILING_RANK.format(failure=failure), "train", *flags]
    started = time.monotonic()
    result = subprocess.run([str(MPIEXEC), "-n", "1", *MNN, *flags, ":", "-n", "1", *rank_one],
                            capture_output=True, text=True, env=ENV, timeout=120)
    return result, time.monotonic() - started


@pytest.mark.parametrize("failure", ['raise RuntimeError("injected failure")', "os.kill(os.getpid(), 9)"],
                         ids=["raises", "killed"])
def test_a_rank_that_fails_ends_the_job_and_the_last_checkpoint_stays(tmp_path, failure):
    result, seconds = failing_job(tmp_path, failure)
    assert result.returncode != 0 and seconds < 60
    if "raise" in failure:
        assert "mnn train (rank 1 of 2): error: injected failure" in result.stderr, (result.returncode, result.stdout)
    assert weights(tmp_path / "run")[1]["step"] == 10  # written whole at step 10, before the failure at 15


@pytest.mark.parametrize("command", [["test", "RUN"], ["generate", "RUN"], ["predict", "RUN", "x.png"], ["gradcheck"]])
def test_the_commands_of_one_process_refuse_mpiexec(monkeypatch, capsys, command):
    """Under mpiexec every rank ran mnn test whole: the report printed once a rank, the ranks' files racing."""
    monkeypatch.setenv("PMI_SIZE", "2")
    for rank, told in (("0", True), ("1", False)):
        monkeypatch.setenv("PMI_RANK", rank)
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert (f"mnn {command[0]}: runs in one process; run it without mpiexec" in err) == told
        assert err.count("\n") <= 1
