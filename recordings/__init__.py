"""Bundled recordings (the demo), shipped as package data."""
