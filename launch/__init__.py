"""Job launchers (submitit on Slurm or locally) around the training and evaluation mains."""
