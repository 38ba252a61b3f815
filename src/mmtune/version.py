"""The package version, in a module of its own: what bundles and the server record, importable from anywhere."""

__version__ = "0.1.0"
