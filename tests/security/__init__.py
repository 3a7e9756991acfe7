"""Attacks against real servers (SPEC §13): each test performs one attack and asserts that it fails."""
