"""Run a script under torch.distributed.run with every server bound to 127.0.0.1.

    python tests/torchrun_loopback.py NPROC SCRIPT [ARGS...]

The tests use it in place of the ``torchrun`` command, which would open its rendezvous store on
every network interface. ``ddp_train_script.launch`` explains how the store is kept on loopback.
"""

import os
import socket
import sys

import torch.distributed as dist
from torch.distributed.run import main as torchrun_main


def main(argv: list[str]) -> None:
    nproc, script, *script_args = argv
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    # The store takes over the socket, and torchrun's static rendezvous reuses it on this port.
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=listener.detach(), wait_for_workers=False
    )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        torchrun_main(["--nproc_per_node", nproc, "--master_addr", "127.0.0.1", "--master_port", str(port), script, *script_args])
    finally:
        del store


if __name__ == "__main__":
    main(sys.argv[1:])
