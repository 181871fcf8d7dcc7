"""A KServe v2 sequence through the stock ``tritonclient[grpc]``; prints one JSON report.

Run in its own interpreter (``python kserve_sequence.py --url HOST:PORT``): tritonclient's protos clash with
ours inside the pytest process. The char LM reads a text in three chunks of one sequence (state kept on the
server between them) and in one stateless call; the test compares the two next-character distributions.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks"
CUTS = [0, 7, 20, len(TEXT)]


def chunk(text: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    with grpcclient.InferenceServerClient(args.url) as c:
        whole = c.infer("charlm", [chunk(TEXT)])
        last = None
        for i in range(len(CUTS) - 1):
            piece = TEXT[CUTS[i] : CUTS[i + 1]]
            last = c.infer("charlm", [chunk(piece)], sequence_id=7, sequence_start=i == 0, sequence_end=i == 2)
        assert last is not None
        print(
            json.dumps(
                {
                    "live": c.is_server_live(),
                    "ready": c.is_model_ready("charlm"),
                    "whole": whole.as_numpy("NEXT_CHAR_PROBS").tolist(),
                    "sequence": last.as_numpy("NEXT_CHAR_PROBS").tolist(),
                    "steps": last.get_response().parameters["seqserve_steps"].int64_param,
                    "chars": len(TEXT),
                }
            )
        )


if __name__ == "__main__":
    main()
