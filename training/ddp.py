"""Data parallel on one host, shared by lm.py and vq.py (`--gpus N`).

N processes, one per GPU (NCCL), or N gloo processes on the CPU for tests; torchrun's environment
works too. Every rank trains the same model on its own draw of the data and the gradients are
averaged, so a step sees N times the batch of one process. Rank 0 alone logs, evaluates and writes.
The learning-rate clock is rank 0's, shared every CLOCK_EVERY steps (`Clock`), so every rank
applies the same rate and stops at the same step without a host sync per step.
"""

import os
import time

import torch

CLOCK_EVERY = 16           # data parallel: steps between two readings of rank 0's clock


class Dist:
    """The process group of a torchrun launch (WORLD_SIZE > 1), or a single process (rank 0 of 1).
    NCCL between GPUs (cuda:LOCAL_RANK), gloo on the CPU."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        if self.world <= 1:
            self.world, self.rank = 1, 0
            return
        import torch.distributed as dist
        self.dist = dist
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self._bufs = {}

    @property
    def main(self):
        return self.rank == 0

    def average_grads(self, params):
        """Every parameter's gradient replaced by its mean over the ranks: one all-reduce of one
        flat buffer, allocated once per set of parameters (vq.py averages its VQ's and its
        discriminator's, and the VQ's set shrinks when the encoder freezes). Pass the trainable
        parameters only: a frozen one given here would get a zero gradient and Adam would move it."""
        if self.world == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        key = (len(grads), sum(g.numel() for g in grads))
        flat = self._bufs.get(key)
        if flat is None:
            flat = self._bufs[key] = torch.empty(key[1], dtype=grads[0].dtype, device=grads[0].device)
        views = [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
        torch._foreach_copy_(views, grads)
        self.dist.all_reduce(flat)
        flat.div_(self.world)
        torch._foreach_copy_(grads, views)

    def mean_(self, t):
        """t (a device tensor) replaced in place by its mean over the ranks."""
        if self.world > 1:
            self.dist.all_reduce(t)
            t.div_(self.world)
        return t

    def broadcast_(self, tensors):
        """Rank 0's values of these device tensors, in place on every rank."""
        if self.world > 1:
            for t in tensors:
                self.dist.broadcast(t, 0)

    def share(self, values):
        """Rank 0's floats, on every rank (a host sync: call it rarely)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.broadcast(t, 0)
        return t.tolist()

    def same_params(self, params):
        """The largest difference between this rank's parameters and rank 0's (0.0: in step)."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        ref = flat.clone()
        self.dist.broadcast(ref, 0)
        diff = (flat - ref).abs().max().reshape(1)
        self.dist.all_reduce(diff, op=self.dist.ReduceOp.MAX)
        return diff.item()

    def close(self):
        if self.world > 1:
            self.dist.barrier()
            self.dist.destroy_process_group()


class Clock:
    """The fraction of the time budget spent, as every rank must see it. One process: the wall
    clock at every step. Data parallel: rank 0's reading and its rate per step, shared at steps
    0, 1, 2, 4, 8 and then every CLOCK_EVERY steps, and extrapolated in between, so the ranks agree on every step's learning
    rate and on the step that ends the run, with no host sync in the other steps. With `steps`,
    the budget is that many steps instead of seconds (the same on every rank and every machine)."""

    def __init__(self, dist, seconds, every=CLOCK_EVERY, steps=None):
        self.dist, self.seconds, self.every, self.steps = dist, seconds, every, steps
        self.t0 = time.time()
        self.base, self.rate, self.base_step = 0.0, 0.0, 0
        self.last = (self.t0, 0)

    def frac(self, step):
        if self.steps:
            return step / self.steps
        if self.dist.world == 1:
            return (time.time() - self.t0) / self.seconds
        if step % self.every == 0 or (step & (step - 1)) == 0:   # and at steps 1, 2, 4, 8: a first rate soon
            now = time.time()
            rate = (now - self.last[0]) / max(1, step - self.last[1]) / self.seconds
            self.last = (now, step)
            self.base, self.rate = self.dist.share([(now - self.t0) / self.seconds, rate])
            self.base_step = step
        return self.base + (step - self.base_step) * self.rate


def launch(main, n, argv):
    """--gpus N: N ranks of the calling script on this host (torch.multiprocessing), each running
    main(argv) with torchrun's environment set."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_entry, args=(main, n, port, argv), nprocs=n, join=True)


def _rank_entry(rank, main, n, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main(argv)
