"""Orchestration above both packages: the evidence study harness (``python -m launch.study``), which
runs pretraining (:mod:`pretrain`) and fine-tuning (:mod:`segment`) over a grid, and the SLURM and
local launch scripts beside it. Nothing in ``pretrain`` or ``segment`` imports from here."""
