"""The Traffic Prediction Engine (TPE): per-protocol load forecasts ahead of demand.

series (cleaning rules) -> datasets (telemetry, MRT, files) -> baselines / models + neural
(training, calibration) -> backtest, metrics, plots -> registry (versions, decisions) ->
serving (Ray Serve). The retraining job is jobs/retrain.py; the Tune search tune/.
"""
