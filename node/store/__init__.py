"""The node's database: studies, instances, jobs, results, outbox; the only code that runs SQL."""
