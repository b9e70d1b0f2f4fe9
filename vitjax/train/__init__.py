"""The training loop and its parts: mesh/sharding, optimizer, checkpoints, metrics."""
