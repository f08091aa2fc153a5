"""Data parallelism over NCCL: `env` (rank and world from the launcher, MPI or Slurm), `rendezvous` (NCCL's id from
rank 0 to every rank), `watchdog` (stop every rank when one dies or hangs), `nccl` (the collectives on CUDA
streams), `dataparallel` (the training loop's view: communicator, barriers, the gradient reducer that runs during
backward), `launch` (`llmpy launch`: one process per GPU)."""
