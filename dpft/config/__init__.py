"""The run config: its schema (`schema`, one `fields.Field` record per field; docs/config.md from
`docs`), loading and JSON (`base`), command-line overrides (`overrides`), older saved configs
(`upgrade`), validation, and what a config builds (`build`: tables, augmentation, model; `optim`)."""
