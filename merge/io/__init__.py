"""Reading checkpoints, resolving model references and writing sharded output."""
