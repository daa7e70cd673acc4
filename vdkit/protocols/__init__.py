"""Protocol nodes: where image bytes come from when they are not a local file (NBD today)."""
