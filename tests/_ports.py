"""The DDP tests' torchrun launch: a free local TCP port for the rendezvous, and the command and
environment of a two-process CPU (gloo) run of a script."""
import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args) -> tuple[list[str], dict[str, str]]:
    """(command, environment) running ``script *args`` as two local ranks, one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
