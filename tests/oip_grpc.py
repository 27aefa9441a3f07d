"""tritonclient's gRPC client in a process of its own: its protos and KServe's define the same `inference.*`
messages, and one protobuf pool refuses both. Reads a JSON request on stdin, prints a JSON answer.

    {"target": "127.0.0.1:PORT", "model": "tiny-sd", "op": "infer" | "metadata" | "ready",
     "inputs": [{"name", "datatype", "shape", "data"}]}   (BYTES data as strings)
    -> {"live", "ready", "metadata"?, "outputs"?: {name: list (BYTES: base64)}, "error"?: str}
An inference answer carries the model's metadata too (one process start less per test).
"""

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def main() -> None:
    req = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(req["target"])
    answer = {"live": client.is_server_live(), "ready": client.is_model_ready(req["model"])}
    try:
        if req["op"] in ("metadata", "infer"):
            answer["metadata"] = client.get_model_metadata(req["model"], as_json=True)
        if req["op"] == "infer":
            inputs = []
            for spec in req["inputs"]:
                inp = grpcclient.InferInput(spec["name"], spec["shape"], spec["datatype"])
                if spec["datatype"] == "BYTES":
                    data = np.array([x.encode() for x in spec["data"]], dtype=np.object_)
                else:
                    data = np.array(spec["data"], dtype=triton_to_np_dtype(spec["datatype"]))
                inp.set_data_from_numpy(data.reshape(spec["shape"]))
                inputs.append(inp)
            result = client.infer(req["model"], inputs, client_timeout=120)
            outputs = {}
            for out in result.get_response(as_json=True)["outputs"]:
                value = result.as_numpy(out["name"])
                outputs[out["name"]] = ([base64.b64encode(v).decode() for v in value.reshape(-1)]
                                        if value.dtype == np.object_ else value.tolist())
            answer["outputs"] = outputs
    except InferenceServerException as e:
        answer["error"] = f"{e.status()}: {e.message()}"
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
