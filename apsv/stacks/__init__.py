"""Small stacks that ship with APSV besides BGP (echo, for measuring the offload path)."""
