"""The runtime: executes traced graphs and plans (one process today, SPMD under torchrun)."""
