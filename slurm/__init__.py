"""SLURM batch scripts (slurm/*.sbatch) and a thin submission helper (python -m slurm.submit)."""
