"""mvi-node: the running service (network, disk, clock)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mvi-node")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

MANUFACTURER = "mvi-node project"
MODEL_NAME = "mvi-node"
