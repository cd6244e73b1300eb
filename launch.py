"""
How this process was started and how it works with the other ranks of its run: train.py's DDP machinery.

- launch_env(env): who started us (torchrun's RANK/LOCAL_RANK/WORLD_SIZE, or SLURM's srun variables) -> the launcher,
  this rank, its local rank, the world size and the ranks on this node.
- PeerWatch: a heartbeat per rank in the rendezvous store, so that a rank that dies or hangs is named by the others
  within seconds (instead of every collective waiting for its timeout), after the checkpoint being written is done.
- unshared_ranks(path, ...): the ranks that cannot see a folder rank 0 writes (a node without the shared filesystem).

Left out on purpose: elastic membership (a rank lost is a run stopped: relaunch with --resume auto), and any
rendezvous of our own: torchrun's, or MASTER_ADDR/MASTER_PORT under SLURM.
"""

import datetime
import os
import re
import socket
import sys
import threading
import time
import uuid

import torch.distributed as dist

LAUNCHERS = {"torchrun": "torchrun (RANK/LOCAL_RANK/WORLD_SIZE)",
             "slurm": "SLURM srun (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; no torchrun variables)"}


def launch_env(env):
    """Who started this process, from its environment: (launcher, rank, local rank, world size, ranks on this node).
    torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE. SLURM's srun (one task per GPU) sets SLURM_PROCID/
    SLURM_LOCALID/SLURM_NTASKS, read when torchrun's are absent (as OpenCLIP does); the rendezvous is then
    MASTER_ADDR/MASTER_PORT, which the sbatch script exports: without them, one ValueError line."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return ("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]),
                int(env.get("LOCAL_WORLD_SIZE", "1")))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ValueError(f"SLURM started {env['SLURM_NTASKS']} tasks but {' and '.join(missing)} "
                             f"{'are' if len(missing) > 1 else 'is'} not set: export the rendezvous in the sbatch script "
                             f"(README, \"On a cluster\")")
        world = int(env["SLURM_NTASKS"])
        per_node = int(re.match(r"\d*", env.get("SLURM_NTASKS_PER_NODE", "")).group() or
                       world // int(env.get("SLURM_NNODES", "1")))
        return "slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), world, per_node
    return None, 0, 0, 1, 1


# A rank that stops (killed, out of memory, its node lost) must not leave the others waiting for the process group's
# timeout (train.py's PG_TIMEOUT). Every rank bumps a counter in the rendezvous store each HEARTBEAT_S from a thread,
# which beats on while the main thread waits in a collective or evaluates. When a collective fails (a dead rank's
# connections close at once), the ranks whose counter stood still for PEER_EXIT_S are the dead ones; when none fails
# (a hung rank, a node gone silent), the next rank's counter standing still for PEER_SILENT_S names it. Either way
# every other rank prints one line naming it and exits (1) within that time, after the checkpoint being written (if
# any) is complete.
HEARTBEAT_S, PEER_EXIT_S, PEER_SILENT_S = 0.5, 5.0, 60.0


class PeerWatch:
    """This rank's heartbeat in the rendezvous store and its watch on the other ranks. The store lives with
    `store_ranks`: under torchrun (static rendezvous, --master_addr) node 0's agent hosts it and goes when one of
    node 0's ranks fails; under SLURM rank 0 hosts it. So when the store stops answering, those are the ranks named.
    `finish` runs before exiting (rank 0 sets it to wait for its checkpoint writer)."""

    def __init__(self, rank, world, store_ranks=(0,), silent_s=PEER_SILENT_S, exit_s=PEER_EXIT_S):
        self.rank, self.world, self.silent_s, self.exit_s = rank, world, silent_s, exit_s
        self.store_ranks = list(store_ranks)
        self.addr = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=silent_s), wait_for_workers=False)
        launch = [uuid.uuid4().hex]  # keys of this launch only: torchrun's store outlives a --max-restarts restart
        dist.broadcast_object_list(launch, src=0)
        self.key = lambda name, r: f"clip-peers/{launch[0]}/{name}{r}"
        self.store.set(self.key("host", rank), socket.gethostname())
        self.store.add(self.key("beat", rank), 1)
        self.finish, self.exiting, self.closed = (lambda: None), threading.Lock(), threading.Event()
        threading.Thread(target=self.beat, daemon=True, name="peer-watch").start()
        sys.excepthook = self.excepthook  # an exception that ends main() asks the store first (excepthook below)

    def count(self, r):
        return self.store.add(self.key("beat", r), 0)  # rank r's heartbeats so far

    def beat(self):
        """The thread: beat, exit when another rank named a stopped one, watch the next rank for PEER_SILENT_S."""
        watched, last, since = (self.rank + 1) % self.world, None, time.monotonic()
        while not self.closed.wait(HEARTBEAT_S):
            try:
                self.store.add(self.key("beat", self.rank), 1)
                if self.store.check([self.key("stopped", "")]):
                    self.exit(self.store.get(self.key("stopped", "")).decode())
                now = self.count(watched)
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since > self.silent_s:
                    self.stop([watched], f"no heartbeat for {self.silent_s:.0f} s")
            except Exception as e:  # the store itself stopped answering: its host is gone
                if not self.closed.is_set():
                    self.exit(self.store_gone(e))

    def excepthook(self, kind, error, tb):
        """An exception ended main(). When it came from peers that stopped (their counters stand still for
        PEER_EXIT_S), one line naming them instead of the collective's traceback; else this rank's own error."""
        if issubclass(kind, Exception) and not self.closed.is_set():
            first = (str(error).strip().splitlines() or [""])[0]  # gloo's: "[.../pair.cc:537] Read error ... . This is..."
            why = kind.__name__ + ": " + re.sub(r"^\[[^]]*\] *", "", first).split(". ")[0][:200]
            try:
                before = [self.count(r) for r in range(self.world)]
                time.sleep(self.exit_s)
                after = [self.count(r) for r in range(self.world)]
            except Exception as e:
                self.exit(f"{self.store_gone(e)}; here: {why}")
            stopped = [r for r in range(self.world) if r != self.rank and before[r] == after[r]]
            if stopped:
                self.stop(stopped, why)
        sys.__excepthook__(kind, error, tb)

    def stop(self, ranks, why):
        """Name the stopped ranks to every rank (through the store), then exit."""
        hosts = [self.store.get(self.key("host", r)).decode() for r in ranks]
        line = (f"rank{'s' * (len(ranks) > 1)} {', '.join(f'{r} (on {h})' for r, h in zip(ranks, hosts))} stopped "
                f"({why})")
        self.store.set(self.key("stopped", ""), line)
        self.exit(line)

    def store_gone(self, e):
        r = self.store_ranks
        who = f"rank {r[0]}" if len(r) == 1 else f"one of node 0's ranks {r[0]}-{r[-1]}, or node 0 itself,"
        return (f"{who} stopped (the rendezvous store at {self.addr}, which ends with {'it' if len(r) == 1 else 'them'}, "
                f"stopped answering: {type(e).__name__})")

    def exit(self, line):
        """One line on stderr, the checkpoint being written completed, then exit at once: a collective stuck on a
        dead peer cannot be unwound, and the process group's teardown would only add gloo's own errors."""
        if not self.exiting.acquire(blocking=False):
            time.sleep(3600)  # another thread of this process is already exiting
        print(f"error: {line}; rank {self.rank} exits. Checkpoints written so far are kept: relaunch the same command "
              f"(with --resume auto) to continue", file=sys.stderr, flush=True)
        try:
            self.finish()
        finally:
            os._exit(1)

    def close(self):
        """The run ended on every rank (the barrier; the watch still runs while it waits): stop watching, so that a
        rank leaving (under SLURM rank 0 hosts the store) is no failure."""
        dist.barrier()
        self.closed.set()


def unshared_ranks(path, rank, world):
    """Ranks that do not see a file rank 0 writes under path (a node without the same filesystem)."""
    name = [f".probe-{uuid.uuid4().hex}"]  # rank 0's random name, sent to all
    dist.broadcast_object_list(name, src=0)
    probe = os.path.join(path, name[0])
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        open(probe, "w").close()
    dist.barrier()
    seen = [None] * world
    dist.all_gather_object(seen, os.path.exists(probe))
    if rank == 0:
        os.unlink(probe)
    return [r for r, ok in enumerate(seen) if not ok]

