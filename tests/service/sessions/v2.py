"""KServe v2 requests for the session tests, through our own generated stubs (in-process)."""

from __future__ import annotations

import numpy as np

from service.api.gen.inference import grpc_service_pb2 as pb

Input = pb.ModelInferRequest.InferInputTensor


def charlm_request(text: str, seq: str, **params: bool | str) -> pb.ModelInferRequest:
    """One step of sequence ``seq`` of the char LM; ``params``: sequence_start=True, seqserve_import="...", ..."""
    contents = pb.InferTensorContents(bytes_contents=[text.encode()])
    request = pb.ModelInferRequest(
        model_name="charlm", inputs=[Input(name="TEXT", datatype="BYTES", shape=[1], contents=contents)]
    )
    request.parameters["sequence_id"].string_param = seq
    for k, v in params.items():
        if isinstance(v, bool):
            request.parameters[k].bool_param = v
        else:
            request.parameters[k].string_param = v
    return request


def probs(r: pb.ModelInferResponse) -> np.ndarray:
    """The NEXT_CHAR_PROBS output (raw little-endian FP32)."""
    i = [o.name for o in r.outputs].index("NEXT_CHAR_PROBS")
    return np.frombuffer(r.raw_output_contents[i], dtype="<f4")
