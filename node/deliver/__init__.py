"""The outbox: result objects sent to their destinations with retries and backoff."""
