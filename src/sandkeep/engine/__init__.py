"""sandkeep.engine."""
