"""SHA-256 without importing hashlib.

Importing hashlib loads OpenSSL (~2 ms), and the Slurm prolog and epilog, on every node for
every container job, hash only a few hundred bytes: the key of the validated policy, the
policy's fingerprint, the names of reference files. CPython's built-in implementation gives
the same digests. Blobs (store.py) are still hashed with hashlib's.
"""

try:
    from _sha256 import sha256  # CPython 3.11 and older
except ImportError:
    try:
        from _sha2 import sha256  # CPython 3.12 and newer
    except ImportError:  # another interpreter
        from hashlib import sha256

__all__ = ["sha256"]
