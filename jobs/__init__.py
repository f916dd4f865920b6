"""The durable job table."""
