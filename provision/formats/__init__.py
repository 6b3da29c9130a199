"""Readers and writers of on-disk formats, standard library only (the agent imports them)."""
