"""Property-based fuzzing of the served OpenAPI: whatever a client sends, the server never answers 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from bptvlm.server.app import build_service, create_app
from bptvlm.server.config import Settings

SETTINGS = Settings(device="cpu", api_keys=("fuzz-key",), max_population=8, max_images=16)
app = create_app(SETTINGS, service=build_service(SETTINGS))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    for headers in ({"Authorization": "Bearer fuzz-key"}, {}):
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert "error" in response.json()
