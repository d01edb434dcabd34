"""External launchers (torchrun, SLURM's srun): which process this is, and the one run folder all share.

Under `torchrun` or `srun` every process runs `seqarch fit` itself, so the processes must agree on one
run folder before any of them can talk to the others (Lightning creates the process group inside
`Trainer.fit`). They agree without talking: the folder is named after the launch, an id every process
of one launch reads from its environment and no other launch shares,

    torchrun      <out_dir>/<recipe>/torchrun-<TORCHELASTIC_RUN_ID>   (--standalone: a fresh id per launch;
                                                                     --rdzv-id=<id>: the id given)
    srun          <out_dir>/<recipe>/slurm-<SLURM_JOB_ID>-<SLURM_STEP_ID>

and only global rank 0 creates it (an atomic mkdir: a folder left by an earlier launch with the same id
is refused, never written into) and writes config.yaml, metrics, checkpoints and summary.json. With
`run_dir=` every process uses that folder; rank 0 refuses one that exists. The launchers are detected
as Lightning detects them (TorchElasticEnvironment, SLURMEnvironment), so seqarch and Lightning agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from seqarch.overrides import ConfigError


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torchrun" or "slurm"
    run_id: str  # the same in every process of one launch
    rank: int  # global rank of this process
    world_size: int


def external_launch() -> Launch | None:
    """The launch this process belongs to, or None when it was started alone (or by Lightning's own
    `strategy=ddp` re-launch, which hands its run folder over itself)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if TorchElasticEnvironment.detect() and "TORCHELASTIC_RUN_ID" in env:
        return Launch("torchrun", env["TORCHELASTIC_RUN_ID"], int(env["RANK"]), int(env["WORLD_SIZE"]))
    if SLURMEnvironment.detect():
        run_id = f"{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
        return Launch("slurm", run_id, int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    return None


def check_launch_settings(launch: Launch, devices: int, num_nodes: int) -> None:
    """ConfigError unless trainer.devices x trainer.num_nodes is the launch's process count (and, where the
    launcher says, devices its processes per node): Lightning checks this too, but only inside fit, after
    the run folder would exist."""
    env = os.environ
    per_node = env.get("LOCAL_WORLD_SIZE") if launch.launcher == "torchrun" else env.get("SLURM_NTASKS_PER_NODE")
    nodes = env.get("SLURM_NNODES") if launch.launcher == "slurm" else None
    if per_node is not None and int(per_node.split("(")[0]) != devices or nodes is not None and int(nodes) != \
            num_nodes or devices * num_nodes != launch.world_size:
        want_devices = int(per_node.split("(")[0]) if per_node else launch.world_size // num_nodes
        want_nodes = int(nodes) if nodes else max(1, launch.world_size // want_devices)
        raise ConfigError(f"{launch.launcher} started {launch.world_size} processes"
                          f"{f' ({per_node} per node)' if per_node else ''}, but trainer.devices={devices} x "
                          f"trainer.num_nodes={num_nodes} = {devices * num_nodes}; set trainer.devices={want_devices} "
                          f"trainer.num_nodes={want_nodes}")


def shared_run_dir(launch: Launch, out_dir: str, recipe: str, run_dir: str | None) -> tuple[Path, bool]:
    """(the launch's run folder, whether this process owns it: global rank 0, which creates it)."""
    path = Path(run_dir) if run_dir is not None else Path(out_dir) / recipe / f"{launch.launcher}-{launch.run_id}"
    if launch.rank != 0:
        return path, False
    if path.exists():
        hint = "choose a new folder" if run_dir is not None else \
            "the launch id is reused (a fixed --rdzv-id or a re-run job step): set run_dir=<new folder>"
        raise ConfigError(f"run folder {str(path)!r} already exists; {hint}")
    path.mkdir(parents=True)
    return path, True


__all__ = ["Launch", "check_launch_settings", "external_launch", "shared_run_dir"]
