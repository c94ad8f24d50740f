"""The `mvi-node serve` process: wiring of its parts, retention, `/metrics` and `/healthz`."""
