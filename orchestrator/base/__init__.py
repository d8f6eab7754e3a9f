"""Layer 0, foundations: errors, storage (local or s3://, retried), leases, outages."""
