"""The server's browser and network options, vLLM's flags: CORS (--allowed-origins and its kin; off by default
here) answered before the API key is asked for, and HTTPS (--ssl-keyfile, --ssl-certfile)."""
from __future__ import annotations

import argparse
import shutil
import subprocess

import httpx
import pytest

from minillm.serve.cli import cors_options, register
from minillm.serve.server import ServerThread, check_ssl
from serve_tiny import tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)

SITE = "http://localhost:3000"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_cors_lets_the_allowed_origin_in_and_no_other():
    app, _ = tiny_app(api_key="sesame", cors=cors_options(_parse("--allowed-origins", f'["{SITE}"]')))
    with ServerThread(app) as srv:
        preflight = httpx.options(srv.url + "/v1/completions", headers={
            "Origin": SITE, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == SITE
        answer = httpx.get(srv.url + "/v1/models", headers={"Origin": SITE, "Authorization": "Bearer sesame"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == SITE
        other = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                           "Authorization": "Bearer sesame"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(srv.url + "/v1/models", headers={"Origin": SITE}).status_code == 401  # the key still


def test_no_cors_headers_by_default():
    assert cors_options(_parse()) is None
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        assert "access-control-allow-origin" not in httpx.get(srv.url + "/health", headers={"Origin": SITE}).headers


def test_cors_flags_are_checked(capsys):
    assert cors_options(_parse("--allowed-origins", '["*"]', "--allowed-methods", '["GET"]')) == {
        "allow_origins": ["*"], "allow_credentials": False, "allow_methods": ["GET"], "allow_headers": ["*"]}
    with pytest.raises(ValueError, match="need --allowed-origins"):
        cors_options(_parse("--allow-credentials"))
    with pytest.raises(SystemExit):
        _parse("--allowed-origins", "http://x")
    assert "must be a JSON list of strings" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_with_a_key_and_certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    app, _ = tiny_app()
    with ServerThread(app, ssl_keyfile=str(key), ssl_certfile=str(cert)) as srv:
        assert srv.url.startswith("https://")
        assert httpx.get(srv.url + "/health", verify=False).status_code == 200
    with pytest.raises(ValueError, match="go together"):
        check_ssl(str(key), None)
    with pytest.raises(ValueError, match="no such file"):
        check_ssl(str(tmp_path / "missing.pem"), str(cert))
