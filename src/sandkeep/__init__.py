"""sandkeep — keeps one persistent cloud machine per user alive, and recovers it on unexpected stops."""

__version__ = "0.1.0"
