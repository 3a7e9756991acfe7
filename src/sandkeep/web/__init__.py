"""sandkeep.web."""
