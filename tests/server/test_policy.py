"""Output policies (server/policy.py) and degradations (server/outputs.py) through the HTTP surface.

Every policy refuses (403) every output it does not allow and answers the rest; the derived outputs
are what their names say; noise is fixed by the request id (also across a restart) and rounding exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.server.ledger import Ledger
from bptvlm.server.policy import parse_policy, stricter
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

W = 32
NAMES = np.array(["dog.", "cat.", "car.", "bus."], dtype=object)
LABELS = np.array([0, 1, 2, 3, 0, 1], dtype=np.int64)
POLICIES = ("logits", "probs", "loss", "topk:2", "label")
# (request name, output, its parameters) -> the permission it needs
ASKS = {
    "loss": ("loss", None), "logits": ("logits", None), "probs": ("probs", None), "label": ("label", None),
    "topk": ("topk", None), "topk-2": ("topk", {"classification": 2}), "topk-3": ("topk", {"classification": 3}),
    "probs-classified-2": ("probs", {"classification": 2}), "logits-classified-2": ("logits", {"classification": 2}),
}
ALLOWS = {
    "logits": set(ASKS),
    "probs": set(ASKS) - {"logits", "logits-classified-2"},
    "loss": {"loss"},
    "topk:2": {"label", "topk", "topk-2", "probs-classified-2"},
    "label": {"label"},
}


def _inputs(pop: int = 3) -> dict[str, np.ndarray]:
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    context = np.random.default_rng(2).normal(0, 0.5, (pop, 4, W)).astype(np.float32)
    return {"text_context": context, "images": images, "labels": LABELS, "class_names": NAMES}


def _ask(client: TestClient, output: str, params: dict | None = None, *, token: str | None = None,
         rid: str | None = None, inputs: dict | None = None):
    body, headers = encode_request(inputs or _inputs(), outputs=(output,), request_id=rid,
                                   output_parameters={output: params} if params else None)
    if token:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    return client.post("/v2/models/clip/infer", content=body, headers=headers)


def _arrays(response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return decode_response(response.content, response.headers.get(HEADER_LENGTH))[1]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A server (policy logits) with one key per policy in its ledger."""
    path = tmp_path_factory.mktemp("policy") / "ledger.db"
    ledger = Ledger(path)
    tokens = {pol: ledger.create_key(f"key-{pol}", outputs=pol) for pol in POLICIES}
    ledger.close()
    with TestClient(create_app(Settings(device="cpu", ledger=str(path), ready_probe_s=0))) as client:
        yield client, tokens


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ask", list(ASKS))
def test_every_policy_refuses_what_it_does_not_allow(keyed, policy: str, ask: str) -> None:
    client, tokens = keyed
    output, params = ASKS[ask]
    r = _ask(client, output, params, token=tokens[policy])
    if ask in ALLOWS[policy]:
        assert output in _arrays(r)
    else:
        assert r.status_code == 403, r.text
        message = r.json()["error"]
        assert f"policy '{policy}'" in message and f"output '{output}'" in message
        allowed = parse_policy(policy).describe()
        assert allowed in message or "K <= 2" in message


def test_metadata_publishes_the_keys_policy(keyed) -> None:
    client, tokens = keyed
    meta = client.get("/v2/models/clip", headers={"Authorization": f"Bearer {tokens['topk:2']}"}).json()
    assert meta["parameters"]["outputs"] == {"policy": "topk:2", "allowed": ["topk", "label"], "topk": 2,
                                             "decimals": None, "noise": 0.0}
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("topk", "BYTES"), ("label", "INT64")]
    assert "classification" in client.get("/v2").json()["extensions"]


def test_stricter_of_server_and_key_wins(tmp_path: Path) -> None:
    assert stricter(parse_policy("probs"), parse_policy("topk:3")).name == "topk:3"
    assert stricter(parse_policy("topk:3"), parse_policy("topk:5")).name == "topk:3"
    assert stricter(parse_policy("topk:3"), parse_policy("label")).name == "label"
    assert stricter(parse_policy("logits"), parse_policy("loss")).name == "loss"
    neither = stricter(parse_policy("loss"), parse_policy("topk:3"))
    assert neither.allowed == frozenset() and neither.name == "loss & topk:3"
    ledger = Ledger(tmp_path / "l.db")
    token = ledger.create_key("wide", outputs="logits")
    ledger.close()
    settings = Settings(device="cpu", ledger=str(tmp_path / "l.db"), outputs="topk:3", ready_probe_s=0)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/v2/models/clip").json()["parameters"]["outputs"]["policy"] == "topk:3"
        assert _ask(client, "logits").status_code == 403
        assert _ask(client, "topk", {"classification": 4}).status_code == 403
        assert _arrays(_ask(client, "topk"))["topk"].shape == (3, 6, 3)  # K: the policy's


@pytest.mark.parametrize("policy", ["label", "topk:2", "probs"])
def test_a_request_without_outputs_gets_what_its_policy_allows(policy: str) -> None:
    with TestClient(create_app(Settings(device="cpu", outputs=policy, ready_probe_s=0))) as client:
        inputs = {k: v for k, v in _inputs().items() if k != "labels"}
        body, headers = encode_request(inputs)
        arrays = _arrays(client.post("/v2/models/clip/infer", content=body, headers=headers))
        assert set(arrays) == {{"label": "label", "topk:2": "topk", "probs": "probs"}[policy]}


@pytest.fixture(scope="module")
def full() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(device="cpu", ready_probe_s=0))) as client:
        yield client


def test_derived_outputs_are_softmax_argmax_and_triton_top_k(full: TestClient) -> None:
    logits = _arrays(_ask(full, "logits"))["logits"]
    probs = _arrays(_ask(full, "probs"))["probs"]
    label = _arrays(_ask(full, "label"))["label"]
    top = _arrays(_ask(full, "topk", {"classification": 3}))["topk"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-5)
    assert probs.dtype == np.float32 and probs.shape == (3, 6, 4)
    assert label.dtype == np.int64 and label.shape == (3, 6)
    np.testing.assert_array_equal(label, logits.argmax(-1))
    assert top.dtype == object and top.shape == (3, 6, 3)
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :3]
    expected = [f"{float(probs[i, n, c]):f}:{c}".encode() for i in range(3) for n in range(6) for c in order[i, n]]
    assert list(top.reshape(-1)) == expected  # Triton: std::to_string(value) + ":" + index, highest first
    classified = _arrays(_ask(full, "probs", {"classification": 3}))["probs"]
    np.testing.assert_array_equal(classified, top)
    assert _arrays(_ask(full, "topk", {"classification": 9}))["topk"].shape == (3, 6, 4)  # K over C: C, as Triton


def test_json_top_k_is_a_list_of_strings(full: TestClient) -> None:
    body, headers = encode_request(_inputs(1), outputs=("topk",), binary=False,
                                   output_parameters={"topk": {"classification": 2}})
    out = full.post("/v2/models/clip/infer", content=body, headers=headers).json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 6, 2]
    value, index = out["data"][0].split(":")
    assert len(value.split(".")[1]) == 6 and 0 <= int(index) < 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"], ids=repr)
def test_a_bad_classification_count_is_400(full: TestClient, bad: object) -> None:
    r = _ask(full, "probs", {"classification": bad})
    assert r.status_code == 400 and "classification" in r.json()["error"]


def test_loss_cannot_be_classified(full: TestClient) -> None:
    r = _ask(full, "loss", {"classification": 2})
    assert r.status_code == 400 and "cannot be classified" in r.json()["error"]


# --- degradations -------------------------------------------------------------------------------


def test_rounding_is_exact(full: TestClient) -> None:
    clean = {o: _arrays(_ask(full, o))[o] for o in ("logits", "probs", "loss")}
    with TestClient(create_app(Settings(device="cpu", output_decimals=2, ready_probe_s=0))) as client:
        for output, values in clean.items():
            got = _arrays(_ask(client, output))[output]
            np.testing.assert_array_equal(got, np.round(values.astype(np.float64), 2).astype(np.float32))
            assert np.abs(got.astype(np.float64) - values).max() <= 0.005 + 1e-6
        top = _arrays(_ask(client, "topk", {"classification": 2}))["topk"]
        assert all(s.decode().split(":")[0][-4:] == "0000" for s in top.reshape(-1))  # %f of a 2-decimal value


def test_noise_is_fixed_by_the_request_id_and_survives_a_restart(full: TestClient, tmp_path: Path) -> None:
    clean = _arrays(_ask(full, "logits"))["logits"]
    ledger = tmp_path / "ledger.db"
    db = Ledger(ledger)
    token = db.create_key("tuner")
    db.close()
    settings = Settings(device="cpu", ledger=str(ledger), output_noise=0.5, ready_probe_s=0)
    with TestClient(create_app(settings)) as client:
        first = _arrays(_ask(client, "logits", token=token, rid="gen-1"))["logits"]
        again = _ask(client, "logits", token=token, rid="gen-1")
        other = _arrays(_ask(client, "logits", token=token, rid="gen-2"))["logits"]
        assert again.headers.get("X-Idempotent-Replay") == "true"
        np.testing.assert_array_equal(_arrays(again)["logits"], first)
    with TestClient(create_app(settings)) as client:  # a restart: the reply cache is gone, the ledger remembers
        after = _ask(client, "logits", token=token, rid="gen-1")
        assert after.headers.get("X-Idempotent-Replay") == "true"
        np.testing.assert_array_equal(_arrays(after)["logits"], first)
        usage = client.get("/v2/usage", headers={"Authorization": f"Bearer {token}"}).json()["usage"]
        assert usage["candidates"] == 6  # gen-1 and gen-2 once each
        label = _arrays(_ask(client, "label", token=token, rid="gen-3"))["label"]
        loss = _arrays(_ask(client, "loss", token=token, rid="gen-3b"))["loss"]
    assert not np.array_equal(first, other)
    noise = (first - clean).reshape(-1)
    assert 0.35 < noise.std() < 0.65 and abs(noise.mean()) < 0.2  # S = 0.5, 72 draws
    assert label.shape == (3, 6) and np.isfinite(loss).all()


def test_noise_comes_before_anything_derived(tmp_path: Path) -> None:
    settings = Settings(device="cpu", output_noise=2.0, ready_probe_s=0)
    with TestClient(create_app(settings)) as client:
        body, headers = encode_request(_inputs(), outputs=("logits", "probs", "label", "loss"), request_id="same")
        arrays = _arrays(client.post("/v2/models/clip/infer", content=body, headers=headers))
    logits = arrays["logits"]
    np.testing.assert_array_equal(arrays["label"], logits.argmax(-1))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(arrays["probs"], e / e.sum(-1, keepdims=True), rtol=1e-5)
    logp = np.log(e / e.sum(-1, keepdims=True))
    np.testing.assert_allclose(arrays["loss"], -logp[:, np.arange(6), LABELS].mean(-1), rtol=1e-5)


def test_serve_flags_reach_the_settings() -> None:
    from bptvlm.cli import build_parser

    args = build_parser().parse_args(["serve", "--outputs", "topk:3", "--output-decimals", "2", "--output-noise", "0.1"])
    assert (args.outputs, args.output_decimals, args.output_noise) == ("topk:3", 2, 0.1)
    with pytest.raises(ValueError, match="topk:K"):
        Settings(outputs="top-3")
    assert json.loads(Settings(outputs="topk:03").model_dump_json())["outputs"] == "topk:3"


def test_a_request_may_ask_for_more_degradation_never_less(full: TestClient) -> None:
    clean = _arrays(_ask(full, "logits"))["logits"]
    body, headers = encode_request(_inputs(), outputs=("logits",), parameters={"output_decimals": 1})
    coarse = _arrays(full.post("/v2/models/clip/infer", content=body, headers=headers))["logits"]
    np.testing.assert_array_equal(coarse, np.round(clean.astype(np.float64), 1).astype(np.float32))
    with TestClient(create_app(Settings(device="cpu", output_decimals=1, ready_probe_s=0))) as client:
        body, headers = encode_request(_inputs(), outputs=("logits",), parameters={"output_decimals": 4})
        np.testing.assert_array_equal(_arrays(client.post("/v2/models/clip/infer", content=body, headers=headers))
                                      ["logits"], coarse)  # the server's 1 decimal stands
    body, headers = encode_request(_inputs(), outputs=("logits",), parameters={"output_noise": 0.5}, request_id="n1")
    noisy = _arrays(full.post("/v2/models/clip/infer", content=body, headers=headers))["logits"]
    assert 0.3 < (noisy - clean).std() < 0.7


@pytest.mark.parametrize("params", [{"output_noise": -1}, {"output_noise": "x"}, {"output_decimals": 2.5},
                                    {"output_decimals": -1}, {"output_decimals": True}], ids=str)
def test_bad_degradation_parameters_are_400(full: TestClient, params: dict) -> None:
    body, headers = encode_request(_inputs(), outputs=("logits",), parameters=params)
    r = full.post("/v2/models/clip/infer", content=body, headers=headers)
    assert r.status_code == 400 and list(params)[0] in r.json()["error"]
