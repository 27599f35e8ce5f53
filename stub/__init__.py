"""stub package."""
