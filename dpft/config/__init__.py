"""The run config: schema and defaults (`base`), validation, and what a config builds (`build`)."""
