"""Process group setup: one process per GPU (or one or more CPU processes), torchrun-style.

Rank and world size come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A plain `finetune-trainer` without torchrun runs as
a group of one, so every code path is the same distributed path.

The world the trainer reports (`World`: world size, nodes, processes per node) is measured, not
read back from its config or launcher flags: after init every process all-gathers its node
(torchrun's GROUP_RANK and the host name) over the process group, so a pod that joined a group of
one counts one node and one process, whatever it was told to expect.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from finetune_trainer.result import World

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    world: World  # the group as measured after init (measure_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_unbuilt_shm_allreduce(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce op (C++) at init unless it
    was prebuilt for the CPU accelerator, which the trainer image's ops are not (they are built
    for CUDA). Compiling it costs over a minute at every pod start (77 s on a 2-core machine)
    and fails where no C++ compiler is installed, while the op only speeds up allreduce between
    CPU processes of one host, which gloo does too. So an op that is not prebuilt is not used."""
    from deepspeed.git_version_info import installed_ops

    name = "deepspeed_shm_comm"
    if installed_ops.get(name):
        return
    deepspeed.ops.__compatible_ops__[name] = False
    logger.info("%s is not prebuilt: allreduce between CPU processes goes through gloo", name)


def setup() -> Distributed:
    if "RANK" not in os.environ:  # a single process started without torchrun
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_local_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # DeepSpeed's CPU accelerator; gloo unless oneCCL bindings are installed.
        device, backend = torch.device("cpu"), "gloo"

    import deepspeed

    if device.type == "cpu":
        _skip_unbuilt_shm_allreduce(deepspeed)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    world = measure_world()
    logger.info("joined %s", world.describe())
    return Distributed(
        rank=dist.get_rank(), local_rank=local_rank, world_size=world.world_size, device=device, world=world
    )


def _node_key() -> tuple[str, str]:
    """This process's node: torchrun's node rank (GROUP_RANK) and the host (a pod's name)."""
    return os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")), socket.gethostname()


def measure_world() -> World:
    """The process group as it is: every process all-gathers its node, and the nodes and the
    processes on each are counted from what came back (one collective, at start)."""
    world_size = dist.get_world_size()
    keys: list = [None] * world_size
    dist.all_gather_object(keys, _node_key())
    per_node = Counter(tuple(key) for key in keys)
    processes_per_node = max(per_node.values())
    announced = int(os.environ.get("LOCAL_WORLD_SIZE", processes_per_node))
    if announced != processes_per_node or len(set(per_node.values())) > 1:
        logger.warning("LOCAL_WORLD_SIZE is %d but the process group holds %s process(es) per node",
                       announced, sorted(per_node.values()))
    return World(world_size=world_size, nodes=len(per_node), processes_per_node=processes_per_node)


def barrier() -> None:
    if dist.is_initialized():
        if torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (one collective for all of them)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_from_main(value):
    holder = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
