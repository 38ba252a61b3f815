"""Data: manifests in, validated rows, lazily decoded samples, collated batches."""
from .manifest import BadRow, BadRowsError, ManifestSpec, read_table, validate_rows

__all__ = ["BadRow", "BadRowsError", "ManifestSpec", "read_table", "validate_rows"]
