"""distillery: research methods as production pipelines."""
