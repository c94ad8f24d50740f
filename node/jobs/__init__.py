"""The worker pool and what a worker process does with a claimed job."""
