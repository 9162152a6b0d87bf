"""The shipped recipes (TOML data files; see ``docs/training.md``)."""
