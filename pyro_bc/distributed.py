"""Data-parallel training: one process per device with torch's ``DistributedDataParallel``.

Launch the script with ``torchrun --nproc_per_node N script.py``; in it, :func:`setup` joins the
process group (gloo on CPU, NCCL on GPUs) and returns the process's device, and
``pyro_bc.fit(..., distributed=True)`` trains on it. Each process draws its shard of every
mini-batch (a ``DistributedSampler`` with the run's seed) and DDP averages the gradients. Because
the model's data plate scales each shard's likelihood by ``dataset_size / shard size``, the
average over processes is the gradient of the whole mini-batch with the KL counted once.
Process 0 writes checkpoints; every process resumes from them.

Example::

    # torchrun --nproc_per_node 2 train.py
    device = pyro_bc.distributed.setup()
    model = LeNet5Caffe(dataset_size=60_000).to(device)
    guide = pyro_bc.StructuredGuide(model)
    pyro_bc.fit(model, guide, train_loader, epochs=100, distributed=True, checkpoint="run.pt")
    pyro_bc.distributed.cleanup()
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


def setup(backend: str | None = None) -> torch.device:
    """Joins the process group ``torchrun`` describes and returns this process's device.

    The backend is NCCL when CUDA is available (device ``cuda:LOCAL_RANK``), gloo otherwise (CPU).

    Example::

        device = pyro_bc.distributed.setup()
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "pyro_bc.distributed.setup: RANK and WORLD_SIZE are not set; launch the script "
                "with torchrun --nproc_per_node N script.py"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def cleanup() -> None:
    """Leaves the process group (call it at the end of the script).

    Example::

        pyro_bc.distributed.cleanup()
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group).

    Example::

        if pyro_bc.distributed.rank() == 0:
            print(report)
    """
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group).

    Example::

        batch_per_process = 128 // pyro_bc.distributed.world_size()
    """
    return dist.get_world_size() if dist.is_initialized() else 1


def require_process_group(what: str) -> None:
    """Raises a clear error when ``what`` needs a process group and there is none."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs a process group: call pyro_bc.distributed.setup() in a script "
            "launched by torchrun --nproc_per_node N"
        )


def shard_loader(loader, *, seed: int = 0) -> DataLoader:
    """This process's share of ``loader``: the same data set, its batch size divided among the
    processes, a ``DistributedSampler`` (shuffled with ``seed`` if ``loader`` shuffles).

    The processes together see one mini-batch of the original size per step. Call
    ``sampler.set_epoch(epoch)`` every epoch (``fit`` does).

    Example::

        shard = shard_loader(DataLoader(train, batch_size=128, shuffle=True), seed=0)
    """
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(
            "distributed training shards a torch DataLoader with a batch_size; got "
            f"{type(loader).__name__}"
        )
    processes = world_size()
    if loader.batch_size % processes:
        raise ValueError(
            f"batch size {loader.batch_size} does not split over {processes} processes: use a "
            f"multiple of {processes}"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=processes,
        rank=rank(),
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size // processes,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def data_parallel(module: torch.nn.Module) -> DistributedDataParallel:
    """Wraps ``module`` (its parameters on this process's device) in ``DistributedDataParallel``.

    Example::

        loss_module = data_parallel(loss_module)
    """
    require_process_group("data_parallel")
    device = next(module.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def barrier() -> None:
    """Waits for every process (nothing to wait for without a process group).

    ``fit`` calls it after process 0 writes a checkpoint, so that no process reads a checkpoint
    before it is written.

    Example::

        pyro_bc.distributed.barrier()
    """
    if dist.is_initialized():
        dist.barrier()


def reduce_epoch(totals: torch.Tensor, first_bad: torch.Tensor) -> None:
    """Sums an epoch's totals and takes the minimum first non-finite step over processes, in place.

    One collective each per epoch: metrics, not gradients (DDP reduces those).
    """
    if dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
