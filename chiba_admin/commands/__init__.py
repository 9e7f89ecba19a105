"""Click commands of chiba-admin, one module per command family."""
