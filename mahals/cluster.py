"""Placeholder replaced in the fan-out step."""
