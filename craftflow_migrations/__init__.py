"""craftflow_migrations: startup and complex migrations and the NAS design import, on Dagster.

One BLAS thread per process unless the environment says otherwise. Every process here is one
core's worth of work (batch steps side by side, the duplicates' pool of one-thread workers),
and OpenBLAS starts a thread per core when numpy loads, which spun for 0.1 s each: about
0.2 CPU-s in every process importing numpy, the worker and the step forkserver included, on
the cores the import start-up runs on. Set here, before any of the package imports numpy,
so that the CLI, a code server loading the definitions and a Celery worker all get it.
"""

from .settings import set_blas_default

set_blas_default()
