"""Test helpers projects import for their own adapters (``merge_core.testing.conformance``)."""
