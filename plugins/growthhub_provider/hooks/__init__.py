"""Hooks of the GrowthHub provider."""
