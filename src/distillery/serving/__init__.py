"""Model serving: kserve.Model predictors and the local ModelServer on 127.0.0.1.

The names below load on first use, so that `python -m distillery.serving` can start importing the model's
libraries before KServe's (a shorter start to ready)."""

__all__ = ["KINDS", "register_kind", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from distillery.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'distillery.serving' has no attribute {name!r}")
