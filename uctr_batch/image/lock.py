"""Locks that work on node-local disks and on shared NFS/Lustre/GPFS caches.

CONTRACT (implemented by the store work; callers rely only on this):

    with FileLock(path, timeout=600.0, stale_after=60.0, what="blob sha256:…"):
        ...

- Exclusive across processes and across hosts sharing the filesystem.
- Not flock-only: acquisition must be atomic on NFS (hard-link / O_EXCL based), with the
  holder refreshing a heartbeat so a crashed holder's lock is detected as stale after
  `stale_after` seconds (or immediately when the holder is on this host and its pid is gone)
  and broken safely.
- On timeout raise errors.StorageError naming `what` and the lock path, with a hint.
"""
