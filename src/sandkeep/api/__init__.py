"""sandkeep.api."""
