"""Pluggable execution backends. Each module holds one; ``_base`` holds the contract."""
