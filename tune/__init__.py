"""Ray Tune searches that retrain APSV's models (run from the repository root or a job's working_dir)."""
