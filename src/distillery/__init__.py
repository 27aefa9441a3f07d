"""distillery: research methods as production pipelines."""

import os as _os

# Nothing is ever downloaded at run time: models and data come from installed packages, data/ and the
# artifact store. Offline mode makes a missing file fail at once instead of trying a hub.
for _var, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    _os.environ.setdefault(_var, _value)

# OpenMP threads that wait for work sleep instead of spinning. A pipeline step shares its CPUs (parallel sweep
# workers on one node, a CPU quota); spinning threads then burn the time the working ones need: one evaluation row
# took 259 s with torch's 2 threads spinning on 2 busy cores, and 22 s with them sleeping. Read when torch loads
# libgomp, so it must be set before `import torch`; a user's own value wins. The predictor undoes the default
# (serving/__main__.py): on its own CPUs a batch-1 request is 2x faster with spinning waiters.
# A child process inherits the value; the marker tells it the value is this default, not the user's.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.update(OMP_WAIT_POLICY="PASSIVE", OMP_WAIT_POLICY_SET_BY="distillery")
OMP_WAIT_DEFAULTED = _os.environ.get("OMP_WAIT_POLICY_SET_BY") == "distillery"
