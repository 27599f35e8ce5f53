"""rsp package."""
