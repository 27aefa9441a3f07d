"""distillery: research methods as production pipelines."""

import os as _os

# Nothing is ever downloaded at run time: models and data come from installed packages, data/ and the
# artifact store. Offline mode makes a missing file fail at once instead of trying a hub.
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    _os.environ.setdefault(_var, _value)

# OpenMP threads that wait for work sleep instead of spinning. A step shares its CPUs (parallel sweep workers in one
# node, a CPU quota, the serving process's own threads); spinning threads then burn the time the working ones need:
# one evaluation row took 259 s with torch's 2 threads spinning on 2 busy cores, and 22 s with them sleeping.
# Read when torch loads libgomp, so it must be set before `import torch`; a user's own value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
