"""The `mvi-node` command line."""
