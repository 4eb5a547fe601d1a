"""Data: the dataset registry and row builders, extraction, the embedded task, chat templates, row accounting."""
