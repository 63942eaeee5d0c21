"""AnoRefiner: reference reproduction of anomaly-aware group-wise refinement for ZSAD.

The package is plain Python (no Snakemake needed); the workflow under ``workflow/`` calls the
``anorefiner`` command-line entry points defined in :mod:`anorefiner.cli`.
"""

__version__ = "0.2.0"
