"""What the launchers share, one concern per module.

options        the option table (`Flag`, `spec`, `make_config`): how every launcher
               declares its flags, and how tests build a config without a command line
cli            `main(run, SPEC)`: defines the flags, starts the distributed runtime,
               runs, turns bad values into one line and exit 1, SIGTERM into a checkpoint
distributed    `jax.distributed` start-up (flags, Slurm, TPU pods), process 0, barriers
sampling       the generator, the sample stream, features and images in batches
outputs        the output directory, progress bars, `metrics.json`
decomposition  the decomposition (`decompose`) and where a launcher's factors come from
edits          an edit's strength (relative alpha) and its ROIR record
real_images    PNG input and output, checks, inversion with the flags
"""
