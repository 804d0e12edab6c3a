"""Protocol stacks: the interface every stack implements and the registry that finds them
(`interface.py`), and the small stacks that ship with APSV besides BGP and BFD (`echo.py`, for
measuring the offload path)."""
