"""Ray job entry points (submit with `ray job submit --working-dir . -- python jobs/<name>.py`)."""
