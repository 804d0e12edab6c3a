"""BFD (RFC 5880, RFC 5881): packets, the session state machine, the agent's transmission program."""
