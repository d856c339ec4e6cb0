"""Training worker: ingest -> features -> train -> register -> gate."""
