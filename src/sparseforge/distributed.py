"""PyTorch DDP under ``torchrun``: process group from the environment, rank-0 decisions broadcast.

Launch: ``torchrun --nproc-per-node N -m sparseforge.cli run RECIPE.toml`` (one machine) or, on several,
``torchrun --nnodes M --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node N -m sparseforge.cli ...``.
Backend: gloo for CPU tensors, and on a machine with CUDA ``cpu:gloo,cuda:nccl``: training on the GPUs
(``TrainConfig.device``) averages CUDA gradients over NCCL, while rank 0's pruning decisions are broadcast as
CPU tensors over gloo (NCCL alone carries only CUDA tensors: choosing it because a GPU happened to be present
made every CPU collective fail). ``SPARSEFORGE_DIST_BACKEND`` overrides it. Each process takes the GPU of its
``LOCAL_RANK``. Every rank runs the same program; masks, pattern libraries
and tickets are computed on rank 0 and broadcast, so all ranks hold bit-identical models; only rank 0
writes checkpoints, run directories and reports. BatchNorm statistics are per rank (as in plain DDP).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


def init_from_env() -> tuple[int, int]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(os.environ.get("SPARSEFORGE_DIST_BACKEND", "cpu:gloo,cuda:nccl" if cuda else "gloo"))
        # a rank killed by a signal inside torch's C++ (SIGABRT, SIGSEGV) leaves torchrun's error file empty: dump
        # every thread's Python stack to stderr so the log says where it was
        import faulthandler

        if not faulthandler.is_enabled():
            faulthandler.enable()
        # torch does not tear the group down at exit: gloo's worker threads then die with the interpreter and a
        # rank aborts ("terminate called without an active exception", SIGABRT) after its work is done, failing
        # the whole torchrun job. Destroying the group while Python is still alive joins them.
        atexit.register(shutdown)
    return rank_world()


def shutdown() -> None:
    """Destroy the process group (idempotent; registered at exit by ``init_from_env``). DDP wrappers caught in
    reference cycles hold the group's backend; collecting them first lets its threads be joined now, while the
    interpreter is whole, rather than during its teardown."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def main_rank_says(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank. Any branch that decides which collectives a rank runs must be decided
    once, here: a rank that looks at a file after rank 0 has written it (``if f.exists(): load else: compute
    and write_json`` - whose barrier the late rank then skips) leaves the ranks waiting in different
    collectives forever (seen as a CI hang under torchrun on 2 busy cores)."""
    if rank_world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.uint8)
    dist.broadcast(t, 0)
    return bool(t.item())


def exists_on_main(path) -> bool:
    """``path.exists()`` as rank 0 sees it, before any rank writes it: what a rank-aware run branches on."""
    return main_rank_says(is_main() and Path(path).exists())


def broadcast_model(model: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer (masks, pattern library) from rank ``src`` to all ranks, in place."""
    if rank_world()[1] == 1:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
                buf = t.contiguous()
                dist.broadcast(buf, src)
                if buf.data_ptr() != t.data_ptr():
                    t.copy_(buf)


def wrap(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """The model as DDP when distributed (gradients averaged across ranks), else unchanged. ``device``: where the
    model trains (a CUDA device gets DDP's single-device placement)."""
    if rank_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # buffers (BatchNorm statistics) follow rank 0 at every forward: DDP's default, spelled per torch version
    # (2.13 renamed broadcast_buffers to forward_sync_buffers and warns on the old name)
    import inspect

    sync = ({"forward_sync_buffers": True} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else {"broadcast_buffers": True})
    if device is not None and device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index, **sync)
    return DDP(model, **sync)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the *global* batch, on any device (torch's
    ``nn.SyncBatchNorm`` runs on GPUs only): per-channel sums and sums of squares are all-reduced with autograd
    (``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradients), so a run on
    k processes computes what one process computes on the same global batch. Outside a distributed training
    forward it is plain ``BatchNorm2d``; the parameters and buffers are the same tensors, so a model converted in
    place keeps its optimizer state and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and rank_world()[1] > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()
        n_local = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), n_local])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - mom).add_(mom * mean.detach())
                self.running_var.mul_(1 - mom).add_(mom * unbiased)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module) -> int:
    """Make every BatchNorm2d of ``model`` a SyncBatchNorm in place (same parameters); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm
            n += 1
    return n
