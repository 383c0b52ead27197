"""The single-node test SLURM now lives in slurm/cluster.py; this name stays for old commands.

    python -m tests.slurm_cluster up DIR   /   python -m tests.slurm_cluster down DIR
"""
import sys

from slurm.cluster import ClusterError, SlurmCluster, ensure_installed, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main(sys.argv))
