"""Data-parallel training (DDP) when started by `torchrun` or `accelerate launch`; nothing otherwise.

The same `finetune` and `distil` run unchanged in one process (the default) or in several:

    torchrun --standalone --nproc_per_node 2 -m champion_cli finetune configs/minilm_full_cpu.yaml # CPU
    torchrun --standalone --nproc_per_node 8 -m champion_cli finetune configs/minilm_lora_gpu.yaml # GPUs
    accelerate launch --multi_gpu --num_processes 8 -m champion_cli finetune configs/minilm_lora_gpu.yaml

Each process trains on its shard of every epoch (a DistributedSampler) with `train.batch_size / world`
rows per step, so the optimisation sees the config's batch size whatever the process count; gradients are
averaged by DDP, so the weights stay identical on every rank. Every rank evaluates the (small) validation
split itself, so all of them take the same best-epoch and early-stopping decisions without talking; only
rank 0 opens the MLflow run, logs and registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str, num_threads: int | None) -> Dist | None:
    """Join the process group a launcher set up in the environment; None when run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's own GPU
    else:  # the ranks on one machine share its cores: oversubscribed threads would slow every step
        torch.set_num_threads(max(1, (num_threads or os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, local_world)


def wrap(model, d: Dist | None, device_type: str):
    """`model` in DDP (when distributed). Buffers are not broadcast: BERT's are constant position ids, and
    a broadcast in every forward would make evaluation a collective call."""
    if d is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if device_type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def sampler(dataset, d: Dist | None, seed: int):
    if d is None:
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)


def barrier(d: Dist | None) -> None:
    if d is not None:
        import torch.distributed as dist

        dist.barrier()


def teardown(d: Dist | None) -> None:
    if d is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
