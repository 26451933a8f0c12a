"""fx: the notebook client for an fx federation."""
