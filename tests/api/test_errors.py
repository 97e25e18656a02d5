"""One voice for errors: a 4xx names the field the client got wrong, and every code is in the table."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO, ServingClient, encode, synthetic_xray
from xray.api import create_app
from xray.api.errors import ERROR_CODES
from xray.decoding import ERROR_STATUSES
from xray.settings import Settings


@pytest.fixture
def client(trained_store):
    with ServingClient(create_app(Settings(storage_uri=str(trained_store)))) as client:
        yield client


def test_a_batch_sent_in_the_wrong_field_names_the_field_files(client):
    answer = client.post("/predict/batch", files={"file": ("a.png", encode(synthetic_xray("NORMAL", 1), "PNG"))})
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "invalid_request" and "`files`" in body["detail"] and "`file`" not in body["detail"]


def test_a_single_image_sent_in_the_wrong_field_names_the_field_file(client):
    answer = client.post("/predict", files={"image": ("a.png", encode(synthetic_xray("NORMAL", 1), "PNG"))})
    assert answer.status_code == 422 and "form field `file` is missing" in answer.json()["detail"]


def test_a_bad_explain_format_names_the_query_parameter_not_the_upload(client):
    answer = client.post("/explain?format=jpg", files={"file": ("a.png", encode(synthetic_xray("NORMAL", 1), "PNG"))})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert "query parameter `format` is invalid (got 'jpg')" in detail and "form field" not in detail


def test_an_unreadable_multipart_body_is_an_invalid_request_naming_the_field(client):
    answer = client.post("/predict", content=b"--x\r\nContent-Disposition: form-data\r\n\r\nno end",
                         headers={"Content-Type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"] == "invalid_request" and "named `file`" in body["detail"], body


@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_two_images_sent_to_a_one_image_route_are_refused_not_half_scored(client, route):
    image = encode(synthetic_xray("NORMAL", 1), "PNG")
    answer = client.post(route, files=[("file", ("a.png", image)), ("file", ("b.png", image))])
    assert answer.status_code == 422
    error, detail = answer.json()["error"], answer.json()["detail"]
    assert error == "invalid_request" and "sent 2 times" in detail and "/predict/batch" in detail
    assert client.post(route, files={"file": ("a.png", image)}).status_code == 200


def test_unknown_routes_answer_the_json_error_shape(client):
    answer = client.get("/no/such/route")
    assert answer.status_code == 404 and answer.json()["error"] == "not_found"


def test_every_error_code_the_api_raises_is_in_the_table():
    sources = "\n".join(path.read_text() for path in (REPO / "xray").rglob("*.py"))
    raised = set(re.findall(r"ApiError\(\s*\d{3},\s*\"(\w+)\"", sources))
    assert raised, "the pattern no longer finds ApiError codes"
    assert raised <= set(ERROR_CODES), f"add {sorted(raised - set(ERROR_CODES))} to ERROR_CODES in xray/api/errors.py"
    assert not set(ERROR_CODES) & set(ERROR_STATUSES)
