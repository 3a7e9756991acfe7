"""sandkeep.cli."""
