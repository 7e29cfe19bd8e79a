"""The installed package's version, which /info, /openapi.json and OpenAI's `system_fingerprint` report."""

from importlib import metadata

try:
    VERSION = metadata.version("sluice")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0.0.0"
