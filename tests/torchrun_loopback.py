"""Run a script under torch.distributed.run with every server bound to 127.0.0.1.

    python tests/torchrun_loopback.py NPROC SCRIPT [ARGS...]

The tests use it in place of the ``torchrun`` command, which would open its rendezvous store on
every network interface. torchrun runs in this process, and its static rendezvous opens a
multi-tenant TCPStore server on master_port. A TCPStore server that creates its own socket binds
it to every interface (LibUVStoreDaemon::tryListen in
torch/csrc/distributed/c10d/TCPStoreLibUvBackend.cpp). A multi-tenant server already running in
the process on that port is reused instead, so ``main`` first opens one on a socket bound to
127.0.0.1.
"""

import os
import socket
import sys

import torch.distributed as dist
from torch.distributed.run import main as torchrun_main


def main(argv: list[str]) -> None:
    """Run ``SCRIPT ARGS`` on NPROC ranks through torch.distributed.run, with its store on 127.0.0.1."""
    nproc, script, *script_args = argv
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    # The store takes over the socket, and torchrun's static rendezvous reuses it on this port.
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=listener.detach(), wait_for_workers=False
    )
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the ranks' gloo connections listen on loopback only
    try:
        torchrun_main(["--nproc_per_node", nproc, "--master_addr", "127.0.0.1", "--master_port", str(port), script, *script_args])
    finally:
        del store


if __name__ == "__main__":
    main(sys.argv[1:])
