"""Top-K outputs read back by Triton's own Python client (``tritonclient.http``), against a real server."""

from __future__ import annotations

import numpy as np
import pytest

from bptvlm.launch import local_server

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (the test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

W = 32  # the tiny model's widths


def _inputs() -> list:
    rng = np.random.default_rng(0)
    arrays = {"text_context": rng.normal(0, 0.5, (2, 4, W)).astype(np.float32),
              "images": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
              "class_names": np.array([b"dog.", b"cat.", b"car.", b"bus."], dtype=object)}
    out = []
    for name, array in arrays.items():
        datatype = {"float32": "FP32", "uint8": "UINT8", "object": "BYTES"}[array.dtype.name]
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        out.append(tensor)
    return out


@pytest.mark.slow
def test_tritonclient_reads_top_k_and_labels_under_a_topk_policy() -> None:
    with local_server(args=["--outputs", "topk:3", "--ready-probe-seconds", "0"]) as url:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        assert "classification" in client.get_server_metadata()["extensions"]
        outputs = [httpclient.InferRequestedOutput("topk", binary_data=True, class_count=3),
                   httpclient.InferRequestedOutput("label", binary_data=True)]
        result = client.infer("clip", _inputs(), outputs=outputs, request_id="triton-1")
        top, label = result.as_numpy("topk"), result.as_numpy("label")
        assert top.shape == (2, 5, 3) and top.dtype == np.object_  # BYTES [P, N, K]
        assert label.shape == (2, 5) and label.dtype == np.int64
        for p in range(2):
            for n in range(5):
                values, indices = zip(*(s.decode().split(":") for s in top[p, n]))
                assert all(len(v.split(".")[1]) == 6 for v in values)  # std::to_string of a float
                assert [float(v) for v in values] == sorted((float(v) for v in values), reverse=True)
                assert int(indices[0]) == label[p, n]
        classified = client.infer("clip", _inputs(), request_id="triton-2",
                                  outputs=[httpclient.InferRequestedOutput("probs", binary_data=False, class_count=2)])
        assert classified.as_numpy("probs").shape == (2, 5, 2)
        with pytest.raises(InferenceServerException, match="policy 'topk:3'"):
            client.infer("clip", _inputs(), outputs=[httpclient.InferRequestedOutput("logits")])
        client.close()
