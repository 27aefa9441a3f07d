"""Model serving: kserve.Model predictors and the local ModelServer on 127.0.0.1."""

from distillery.serving.server import KINDS, register_kind, serve

__all__ = ["KINDS", "register_kind", "serve"]
