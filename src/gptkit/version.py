"""The installed gptkit's version, in a leaf module so checkpoints and shards can record it without
importing the package (and the API above them)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
