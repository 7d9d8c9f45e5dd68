"""Named hyperparameter presets (YAML), one file per method."""
