"""Shared test settings: property tests never fail on timing (CI machines are small and busy)."""

from hypothesis import settings

settings.register_profile("kvlib", deadline=None, print_blob=True)
settings.load_profile("kvlib")
