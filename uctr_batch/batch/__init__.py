"""Batch-system integration: job context, readiness records, privilege drop, and the
Slurm prolog/epilog logic (the thin scripts in hooks/ call into here)."""
