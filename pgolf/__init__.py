"""pgolf: composable, exact and fast Parameter Golf training."""

__version__ = "0.1.0"
