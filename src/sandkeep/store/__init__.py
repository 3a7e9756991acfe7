"""sandkeep.store."""
