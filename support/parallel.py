"""Several processes (torchrun): train.py's only multi-process code, entered under torchrun alone.

    torchrun --standalone --nproc_per_node 8 train.py --model checkpoints/llama-2-7b --data alpaca.json
    torchrun --standalone --nproc_per_node 8 train.py ... --shard     # FSDP2: each rank holds 1/8 of the base

Every rank holds the frozen base (or its shard, with --shard) and the same tiny Aligner, and takes
its share of every optimizer step's micro-batches; the Aligner's gradients are summed once per
step (for a few thousand numbers that is all DistributedDataParallel would do). NCCL on GPUs,
gloo on CPUs. With one process every function here does nothing.
Read next: report.py.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from support.errors import UserError


@dataclass
class Ranks:
    """The processes of a run, and the few things they do together."""
    rank: int  # this process; 0 logs, evaluates its sample and saves
    world: int  # how many processes
    device: torch.device

    @classmethod
    def join(cls, device: torch.device, shard: bool) -> "Ranks":
        """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
        world_text = os.environ.get("WORLD_SIZE", "1")
        if not world_text.isdigit() or int(world_text) < 1:
            raise UserError(f"WORLD_SIZE={world_text!r} is not a number of processes: unset it, or start "
                            f"with torchrun")
        world = int(world_text)
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if world > 1 and missing:
            raise UserError(f"WORLD_SIZE={world} is set, but not {', '.join(missing)}: start several "
                            f"processes with torchrun --nproc_per_node {world} train.py ..., or unset "
                            f"WORLD_SIZE")
        if world == 1:
            if shard:
                raise UserError("--shard splits the model across processes: start with torchrun "
                                "--nproc_per_node K")
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, device)

    def shard(self, model):
        """FSDP2: each rank keeps 1/world of every layer, gathered just in time."""
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)

    def all_sum(self, value: float) -> float:
        """value summed over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # (1,)
        dist.all_reduce(t)
        return t.item()

    def sum_grads(self, params):
        """Gradients summed over the ranks: the same step a single process takes."""
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad)

    def finish(self):
        if self.world > 1:
            dist.destroy_process_group()
