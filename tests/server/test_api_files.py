"""The files API through the real openai client: upload, wait, list with cursor pagination, retrieve, content,
delete; the limits (purpose, .jsonl, size) and ids that try to name a path."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import start_server, write_chat_jsonl


def test_upload_is_processed_retrievable_and_its_content_is_the_bytes_sent(client, chat_jsonl):
    path = chat_jsonl(12)
    strict = openai.OpenAI(base_url=str(client.base_url), api_key="x", max_retries=0,
                           _strict_response_validation=True)
    with path.open("rb") as f:
        made = strict.files.create(file=f, purpose="fine-tune")
    assert made.id.startswith("file-") and made.object == "file"
    assert made.bytes == path.stat().st_size and made.filename == "train.jsonl" and made.purpose == "fine-tune"
    assert strict.files.wait_for_processing(made.id, poll_interval=0.1, max_wait_seconds=5).status == "processed"
    assert strict.files.retrieve(made.id) == made
    assert strict.files.content(made.id).read() == path.read_bytes()


def test_list_pages_with_after_and_limit_in_both_orders(api_server, tmp_path):
    client = api_server.client()
    before = {f.id for f in client.files.list().data}
    made = []
    for i in range(5):
        with write_chat_jsonl(tmp_path / f"p{i}.jsonl", 10, start=i * 10).open("rb") as f:
            made.append(client.files.create(file=f, purpose="fine-tune").id)
    newest_first = [f.id for f in client.files.list(limit=2).data if f.id not in before]
    assert newest_first == made[::-1][:2]

    page = client.files.list(limit=2)
    assert page.has_more and len(page.data) == 2
    raw = client.files.with_raw_response.list(limit=2).http_response.json()
    assert raw["first_id"] == page.data[0].id and raw["last_id"] == page.data[1].id
    walked = [f.id for f in client.files.list(limit=2)]  # auto-pagination follows after=last id
    assert [i for i in walked if i in made] == made[::-1]
    assert len(walked) == len(set(walked))

    ascending = [f.id for f in client.files.list(order="asc", limit=3)]
    assert [i for i in ascending if i in made] == made
    assert client.files.list(purpose="batch").data == []


def test_delete_removes_the_file_and_its_content(api_server, chat_jsonl):
    client = api_server.client()
    with chat_jsonl(10).open("rb") as f:
        made = client.files.create(file=f, purpose="fine-tune")
    stored = api_server.data_dir / "files" / made.id
    assert stored.is_file()
    deleted = client.files.delete(made.id)
    assert deleted.id == made.id and deleted.deleted is True
    assert not stored.exists()
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(made.id)
    assert caught.value.code == "file_not_found"
    assert made.id not in {f.id for f in client.files.list()}
    with pytest.raises(openai.NotFoundError):
        client.files.delete(made.id)


def test_uploads_other_than_fine_tune_jsonl_are_refused_with_the_field_named(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text('{"messages": []}\n')
    with pytest.raises(openai.BadRequestError) as caught, text.open("rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    assert caught.value.param == "file" and ".jsonl" in caught.value.message
    good = write_chat_jsonl(tmp_path / "a.jsonl", 10)
    with pytest.raises(openai.BadRequestError) as caught, good.open("rb") as f:
        client.files.create(file=f, purpose="assistants")
    assert caught.value.param == "purpose"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(openai.BadRequestError) as caught, empty.open("rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    assert "empty" in caught.value.message


def test_a_file_name_with_a_path_is_only_a_display_name(api_server, tmp_path):
    body = write_chat_jsonl(tmp_path / "x.jsonl", 10).read_bytes()
    answer = httpx.post(f"{api_server.base_url}/files", data={"purpose": "fine-tune"},
                        files={"file": ("../../escape/../../x.jsonl", body, "application/jsonl")})
    assert answer.status_code == 200, answer.text
    made = answer.json()
    assert made["filename"] == "x.jsonl"
    assert sorted(p.name for p in (api_server.data_dir / "files").iterdir() if p.name == made["id"]) == [made["id"]]
    assert not (api_server.data_dir.parent / "escape").exists()


@pytest.mark.parametrize("file_id", ["../tunesmith.db", "..%2Ftunesmith.db", "%2e%2e%2ftunesmith.db",
                                     "file-../../tunesmith.db", "tunesmith.db"])
def test_ids_that_name_paths_are_not_found(api_server, file_id):
    for url in (f"{api_server.base_url}/files/{file_id}", f"{api_server.base_url}/files/{file_id}/content"):
        answer = httpx.get(url)
        assert answer.status_code == 404, (url, answer.text)
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        assert b"SQLite" not in answer.content


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(tmp_path):
    with start_server(tmp_path / "data", extra=["--max-upload-mb", "1"]) as server:
        client = server.client()
        big = tmp_path / "big.jsonl"
        line = b'{"messages": [{"role": "user", "content": "' + b"x" * 1000 + b'"}]}\n'
        big.write_bytes(line * 1100)  # 1.1 MB > 1 MiB
        with pytest.raises(openai.APIStatusError) as caught, big.open("rb") as f:
            client.files.create(file=f, purpose="fine-tune")
        assert caught.value.status_code == 413 and caught.value.code == "file_too_large"
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert list((server.data_dir / "files").iterdir()) == []
        assert client.files.list().data == []
