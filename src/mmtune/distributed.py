"""Where this process stands in a distributed run (Lightning's launcher, torchrun, SLURM), and the samplers
that make every process see its own share of the rows.

mmtune never launches processes or reduces tensors itself: Lightning's strategies (DDP, FSDP, DeepSpeed) do.
What is here decides which process writes (only the main one) and how rows are dealt out."""
from __future__ import annotations

import math
import os
from typing import Iterator, Tuple

import torch
from torch.utils.data import DistributedSampler


def is_main_process() -> bool:
    """True unless the environment says this is a non-zero rank: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun
    with several tasks), or ``LOCAL_RANK`` / ``NODE_RANK`` (the processes Lightning's launcher starts)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("LOCAL_RANK", "0")) == 0 and int(env.get("NODE_RANK", "0")) == 0


def world() -> Tuple[int, int]:
    """(number of processes, this one's rank) of the initialised process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def shards_weights(strategy) -> bool:
    """Whether a Lightning strategy leaves the module's live weights sharded across the processes after training
    (FSDP, DeepSpeed, model-parallel), so that only a consolidated checkpoint holds them whole."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))


def training_device(accelerator: str) -> torch.device:
    """Where this process will train, known before Lightning starts (for the embedding cache): its own GPU
    (``LOCAL_RANK``) when ``trainer.accelerator`` allows one and the machine has it, else the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def train_sampler(dataset, seed: int) -> DistributedSampler:
    """The epoch's shuffled order — a permutation seeded by ``seed + epoch`` — dealt out to the processes.
    One process gets the whole permutation, so that a run on N processes with batch B steps through the same
    rows as one process with batch N×B (the same sets of rows per step)."""
    n, rank = world()
    return DistributedSampler(dataset, num_replicas=n, rank=rank, shuffle=True, seed=seed, drop_last=False)


class LengthBuckets(DistributedSampler):
    """The training order of :func:`train_sampler`, arranged so that each batch holds texts of similar length
    (``data.bucket_by_length``): the epoch's seeded permutation is cut into pools of 50 global batches
    (``batch_size`` × processes), each pool sorted by length and cut into global batches, and the batches are
    shuffled; each process takes its interleaved share, so its batch comes from one global batch. Every row is
    still seen once per epoch; batches pad to their own longest text, so less padding is computed."""

    def __init__(self, dataset, lengths, batch_size: int, seed: int, pool: int = 50, replicas: Tuple[int, int] = None):
        n, rank = replicas or world()
        super().__init__(dataset, num_replicas=n, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.lengths = list(lengths)
        self.batch_size, self.pool = batch_size, pool

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        order += order[: self.total_size - len(order)]  # even shares, as DistributedSampler pads
        width = self.batch_size * self.num_replicas
        batches = []
        for start in range(0, len(order), width * self.pool):
            chunk = sorted(order[start:start + width * self.pool], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + width] for i in range(0, len(chunk), width)]
        # only the very last batch may be short; shuffled into the middle it would shift every later batch's rows
        full, short = [b for b in batches if len(b) == width], [b for b in batches if len(b) < width]
        flat = [i for b in [full[j] for j in torch.randperm(len(full), generator=g).tolist()] + short for i in b]
        return iter(flat[self.rank:self.total_size:self.num_replicas])


def text_lengths(dataset) -> list:
    """Per row, the words in its text columns (a cheap stand-in for the token count)."""
    from .modalities import kind

    import numpy as np

    lengths = np.zeros(len(dataset), dtype=np.int64)
    for m in [m for m, _ in getattr(dataset, "columns", []) if kind(m) == "text"]:
        lengths += np.fromiter((len(str(v).split()) if isinstance(v, str) else 0 for v in dataset.cells(m)),
                               dtype=np.int64, count=len(dataset))
    return lengths.tolist()


class EvalShard(DistributedSampler):
    """Evaluation rows dealt out to the processes without padding: every row is scored exactly once (a
    DistributedSampler would repeat rows to even out the shares, and count them twice in the metrics)."""

    def __init__(self, dataset):
        n, rank = world()
        super().__init__(dataset, num_replicas=n, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.dataset) - self.rank) / self.num_replicas))
