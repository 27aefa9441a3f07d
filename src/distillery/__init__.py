"""distillery: research methods as production pipelines."""

import os as _os

# Nothing is ever downloaded at run time: models and data come from installed packages, data/ and the
# artifact store. Offline mode makes a missing file fail at once instead of trying a hub.
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    _os.environ.setdefault(_var, _value)
