"""detect: anomaly detectors over the counters and the socket polls, their engine, config and event sinks."""
