"""The per-rank launcher (uctr-exec): rank context + staging + shared namespace -> exec.

Everything imported from here runs once per MPI rank, so it uses the standard library only.
"""
