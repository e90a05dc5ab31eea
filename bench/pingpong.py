"""osu_latency-style ping-pong between two MPI ranks (mpi4py), 1 B to 4 MiB.

    mpirun -np 2 python3 pingpong.py [MAX_BYTES]

Rank 0 prints one JSON object: {"sizes": [...], "latency_us": [...], "bandwidth_mbs": [...]}
with the one-way latency (half a round trip, averaged over the timed iterations) and the
ping-pong bandwidth (bytes / one-way latency) of every message size. Runs the same inside
a container (its own mpi4py) and on the host. Standard library + mpi4py only.
"""

import json
import sys
import time

from mpi4py import MPI


def iterations(size: int):
    """(warm-up, timed) iterations: many for small messages, fewer for large ones."""
    timed = max(50, min(10000, (64 << 20) // max(size, 4096)))
    return timed // 10 + 5, timed


def pingpong(comm, size: int) -> float:
    """One-way latency in seconds for SIZE-byte messages between ranks 0 and 1."""
    rank = comm.Get_rank()
    buf = bytearray(size)
    msg = [buf, MPI.BYTE]
    warmup, timed = iterations(size)
    for i in range(warmup + timed):
        if i == warmup:
            comm.Barrier()
            start = MPI.Wtime()
        if rank == 0:
            comm.Send(msg, dest=1, tag=7)
            comm.Recv(msg, source=1, tag=7)
        else:
            comm.Recv(msg, source=0, tag=7)
            comm.Send(msg, dest=0, tag=7)
    return (MPI.Wtime() - start) / (2 * timed)


def main() -> int:
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            sys.stderr.write("pingpong needs exactly 2 ranks, got %d\n" % comm.Get_size())
        return 2
    max_bytes = int(sys.argv[1]) if len(sys.argv) > 1 else 4 << 20
    sizes, latency, bandwidth = [], [], []
    size = 1
    started = time.monotonic()
    while size <= max_bytes:
        seconds = pingpong(comm, size)
        sizes.append(size)
        latency.append(seconds * 1e6)
        bandwidth.append(size / seconds / 1e6)
        size *= 2
    if comm.Get_rank() == 0:
        print(json.dumps({"sizes": sizes, "latency_us": latency, "bandwidth_mbs": bandwidth,
                          "library": MPI.Get_library_version().split("\0")[0].splitlines()[0]
                          .strip(),
                          "seconds": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
