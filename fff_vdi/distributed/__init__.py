"""Process groups and the one parallelisation step (checkpointing, compile, FSDP2)."""
