"""sandkeep.host."""
