"""A job's checkpoints: what they look like on the box, and the remote they are copied to."""
