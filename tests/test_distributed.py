"""Distributed launches: the run-folder agreement under torchrun / SLURM (environments faked, no cluster),
a real 2-process torchrun launch with gloo on CPU (one run folder, rank 0 writes, resume continues), and
FSDP on CPU refused in one line before any folder exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqarch.cli import main
from seqarch.overrides import ConfigError
from seqarch.train.launch import Launch, check_launch_settings, external_launch, shared_run_dir

LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME",
                    "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES",
                    "SLURM_LOCALID", "SLURM_NODEID")
TINY = ["recipe=s4d", "data=induction", "data.seq_len=16", "data.vocab_size=8", "data.batch_size=4",
        "data.num_train=64", "data.num_val=8", "model.d_model=16", "model.n_layers=1", "trainer.val_batches=1",
        "trainer.num_threads=1", "trainer.progress=false", "optim.warmup_steps=1"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fake_slurm(env, procid: int, job: str = "77", step: str = "3"):
    for name, value in {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": job, "SLURM_STEP_ID": step,
                        "SLURM_PROCID": str(procid), "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2",
                        "SLURM_LOCALID": str(procid % 2), "SLURM_NODEID": str(procid // 2)}.items():
        env.setenv(name, value)


def fake_torchrun(env, rank: int, run_id: str = "abc123", world: int = 2, local: int = 2):
    for name, value in {"TORCHELASTIC_RUN_ID": run_id, "RANK": str(rank), "LOCAL_RANK": str(rank % local),
                        "GROUP_RANK": str(rank // local), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(local),
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        env.setenv(name, value)


def test_a_plain_process_is_no_launch(clean_env):
    assert external_launch() is None


def test_every_slurm_task_agrees_on_one_folder_and_only_rank_0_creates_it(clean_env, tmp_path):
    folders = []
    for procid in (2, 0, 3, 1):  # rank order does not matter: nobody but rank 0 touches the disk
        fake_slurm(clean_env, procid)
        launch = external_launch()
        assert launch == Launch("slurm", "77-3", procid, 4)
        folders.append(shared_run_dir(launch, str(tmp_path / "runs"), "mamba", None))
        assert folders[-1][0].exists() == (procid in (0, 3, 1)), "only rank 0 creates the folder"
    assert {path for path, _ in folders} == {tmp_path / "runs" / "mamba" / "slurm-77-3"}
    assert [owner for _, owner in folders] == [False, True, False, False]
    fake_slurm(clean_env, 0)
    with pytest.raises(ConfigError, match="already exists; the launch id is reused"):
        shared_run_dir(external_launch(), str(tmp_path / "runs"), "mamba", None)
    fake_slurm(clean_env, 0, step="4")  # the next job step is a new run
    assert shared_run_dir(external_launch(), str(tmp_path / "runs"), "mamba", None)[1]


def test_an_explicit_run_dir_is_shared_and_claimed_by_rank_0(clean_env, tmp_path):
    fake_torchrun(clean_env, 1)
    path, owner = shared_run_dir(external_launch(), "runs", "mamba", str(tmp_path / "mine"))
    assert (path, owner) == (tmp_path / "mine", False) and not path.exists()
    fake_torchrun(clean_env, 0)
    assert shared_run_dir(external_launch(), "runs", "mamba", str(tmp_path / "mine")) == (tmp_path / "mine", True)
    with pytest.raises(ConfigError, match="already exists; choose a new folder"):
        shared_run_dir(external_launch(), "runs", "mamba", str(tmp_path / "mine"))


def test_torchrun_wins_over_the_slurm_allocation_it_runs_in(clean_env):
    fake_slurm(clean_env, 0)
    fake_torchrun(clean_env, 1, run_id="xyz", world=8, local=4)
    assert external_launch() == Launch("torchrun", "xyz", 1, 8)


def test_devices_and_num_nodes_must_match_the_launch(clean_env):
    fake_slurm(clean_env, 0)
    launch = external_launch()
    check_launch_settings(launch, devices=2, num_nodes=2)
    with pytest.raises(ConfigError, match=r"slurm started 4 processes \(2 per node\).*set trainer.devices=2 "
                                          r"trainer.num_nodes=2"):
        check_launch_settings(launch, devices=4, num_nodes=1)
    fake_torchrun(clean_env, 0, world=8, local=4)
    launch = external_launch()
    check_launch_settings(launch, devices=4, num_nodes=2)
    with pytest.raises(ConfigError, match="set trainer.devices=4 trainer.num_nodes=2"):
        check_launch_settings(launch, devices=4, num_nodes=1)


def test_fsdp_on_cpu_is_one_line_naming_ddp_and_no_run_folder(tmp_path, capsys):
    assert main(["fit", *TINY, "trainer.strategy=fsdp", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "needs GPUs" in err and "trainer.strategy=ddp" in err
    assert not any(tmp_path.iterdir())


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's seqarch
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "seqarch.cli", "fit", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)  # three launches of two processes, each importing Lightning, on a loaded 2-core machine
def test_a_two_process_torchrun_launch_writes_one_run_and_resumes(tmp_path):
    """gloo on CPU: one run folder for both processes, rank 0 alone writes the summary and prints it, the
    checkpoint loads with weights_only, and a second launch resumes from it to more steps."""
    from seqarch.runs import read_checkpoint

    out = tmp_path / "runs"
    first = torchrun([*TINY, "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=4",
                      "trainer.val_every=2", f"out_dir={out}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (out / "s4d").iterdir()
    assert run.name.startswith("torchrun-")
    assert first.stdout.count("seqarch fit: s4d done") == 1, first.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["status"]) == (4, "completed")
    path, contents = read_checkpoint(str(run))
    assert contents["global_step"] == 4 and all(torch.isfinite(v).all() for v in contents["state_dict"].values())

    second = torchrun([f"ckpt={run}", "trainer.max_steps=6", f"out_dir={out}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    (resumed,) = set((out / "s4d").iterdir()) - {run}
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == str(path)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4, "the first run is left as it was"

    wrong = torchrun([*TINY, "trainer.strategy=ddp", "trainer.devices=1", f"out_dir={tmp_path / 'no'}"], tmp_path)
    assert wrong.returncode != 0 and "set trainer.devices=2 trainer.num_nodes=1" in wrong.stderr
    assert not (tmp_path / "no").exists()
