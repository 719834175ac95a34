"""The OpenAI-compatible HTTP API: ``create_app(settings, store)`` builds the FastAPI app.

Routes under ``/v1``: files, fine_tuning/jobs (+ events, checkpoints, cancel, pause, resume), models; the chat
completions router (``chat_api``) and the dashboard (``dashboard``) are included. Every error, ours or the
framework's (validation, unknown route, wrong method, malformed JSON), leaves as OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` with the status the ``openai`` client maps to its exceptions,
and ``x-should-retry: false`` where a retry cannot help (the client otherwise retries 409s and 5xx).

Auth: with keys required (any address but loopback, ``--require-keys``, or once a key exists) every ``/v1`` and
dashboard request needs ``Authorization: Bearer <key>``; each file and job belongs to the key that made it, and
another key's object is a 404, as if it did not exist. Without keys everything belongs to ``local``.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..files import atomic_file, remove
from . import chat_api, dashboard, db, jobs, schemas
from .inference import ModelSpec, Registry, spec_for_artefact
from .settings import ServerSettings

log = logging.getLogger(__name__)

LOCAL_OWNER = "local"
UPLOAD_PURPOSES = ("fine-tune",)
MAX_FILENAME = 255
FORM_OVERHEAD = 64 * 1024
"""Multipart boundaries and the ``purpose`` field on top of the file itself, allowed before a request is refused
by its Content-Length alone."""
ID_PATTERNS = {"file": re.compile(r"file-[0-9a-f]{24}"), "job": re.compile(r"ftjob-[0-9a-f]{24}")}
COPY_BLOCK = 1 << 20


class ApiError(Exception):
    """An error the API answers with OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = schemas.ErrorEnvelope(error=schemas.ErrorDetail(message=message, type=type, param=param, code=code))
    # 4xx other than timeouts and rate limits: the same request fails the same way again, so the client must not
    # retry it (its default retries 409s); 5xx and 429 keep the client's own retry policy.
    retry = {} if status >= 500 or status in (408, 429) else {"x-should-retry": "false"}
    return JSONResponse(body.model_dump(), status_code=status, headers=retry | (headers or {}))


NOT_FOUND_CODES = {"file": "file_not_found", "fine-tuning job": "job_not_found"}


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {kind}: {object_id!r}", param=param, code=NOT_FOUND_CODES[kind])


# --- turning records into OpenAI objects ----------------------------------------------------------------------------

def file_object(f: db.File) -> schemas.FileObject:
    return schemas.FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename,
                              purpose=f.purpose, status=f.status, status_details=f.status_details)


def job_object(j: db.Job) -> schemas.FineTuningJob:
    return schemas.FineTuningJob(
        id=j.id, created_at=j.created_at, error=schemas.JobError(**j.error) if j.error else None,
        fine_tuned_model=j.fine_tuned_model, finished_at=j.finished_at,
        hyperparameters=schemas.ResolvedHyperparameters(**j.hyperparameters), model=j.model,
        organization_id=f"org-{j.owner}", result_files=list(j.result_files), seed=j.seed, status=j.status,
        trained_tokens=j.trained_tokens, training_file=j.training_file, validation_file=j.validation_file,
        estimated_finish=j.estimated_finish, metadata=j.metadata or None, method=schemas.ResolvedMethod(**j.method))


def event_object(e: db.Event) -> schemas.FineTuningJobEvent:
    return schemas.FineTuningJobEvent(id=e.id, created_at=e.created_at, level=e.level, message=e.message,
                                      data=e.data, type=e.type)


def checkpoint_object(c: db.Checkpoint) -> schemas.FineTuningJobCheckpoint:
    return schemas.FineTuningJobCheckpoint(id=c.id, created_at=c.created_at,
                                           fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
                                           fine_tuning_job_id=c.job_id, metrics=schemas.CheckpointMetrics(**c.metrics),
                                           step_number=c.step_number)


def page_object(page: db.Page[Any], convert: Any) -> dict[str, Any]:
    data = [convert(item) for item in page.items]
    return schemas.ListPage[Any](data=data, has_more=page.has_more, first_id=data[0].id if data else None,
                                 last_id=data[-1].id if data else None).model_dump(mode="json")


# --- request helpers ------------------------------------------------------------------------------------------------

def display_name(raw: str | None) -> str:
    """The upload's file name for display only: its last path component, whatever the client sent."""
    name = PurePosixPath((raw or "").replace("\\", "/")).name.strip()
    return name[:MAX_FILENAME]


def metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[k]=v`` query parameters (how the openai client sends ``metadata={k: v}``)."""
    found = {}
    for key, value in request.query_params.multi_items():
        match = re.fullmatch(r"metadata\[(.+)\]", key)
        if match:
            found[match.group(1)] = value
    return found


def count_examples(path: Path) -> int:
    """Non-blank lines of a JSONL file: the number the ``auto`` hyperparameters are chosen for (the worker's data
    stage validates the lines themselves)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def store_upload(upload: UploadFile, target: Path, size: int) -> None:
    with atomic_file(target, size, what="the uploaded file") as staging, staging.open("wb") as out:
        shutil.copyfileobj(upload.file, out, COPY_BLOCK)


UNION_TAG = re.compile(r"(int|float|str|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|constrained-.*|function-.*)")
"""Parts of a pydantic error location that name a union's member (``n_epochs.literal['auto']``), not a field."""


def param_of(loc: tuple[Any, ...]) -> str | None:
    """The request field an error is about, in OpenAI's dotted form (``method.supervised.hyperparameters``)."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not UNION_TAG.fullmatch(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                "HTTP library correctly. The OpenAI API expects a JSON payload.)"), None
    param = param_of(tuple(errors[0].get("loc", ())))
    # a value outside "auto" | number fails both members; the number's complaint says what is allowed
    about = [e for e in errors if param_of(tuple(e.get("loc", ()))) == param]
    first = next((e for e in about if e.get("type") != "literal_error"), about[0])
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return f"Invalid value for '{param}': {first.get('msg')}", param


# --- the app --------------------------------------------------------------------------------------------------------

def create_app(settings: ServerSettings, store: db.Store) -> FastAPI:
    """The API for ``settings`` over ``store`` (already upgraded)."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    started = int(time.time())
    files_dir = settings.files_dir
    files_dir.mkdir(parents=True, exist_ok=True)

    # ----- errors

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "The server had an error while processing your request.", type="server_error")

    # ----- auth

    def caller(request: Request) -> str | None:
        """The caller's key id, or None when this server needs no keys (then every object is the caller's)."""
        if not (settings.api_keys_required or store.has_api_keys()):
            return None
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(401, "You didn't provide an API key. Provide it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY); `tunesmith server keys create NAME` makes one.",
                           code="missing_api_key")
        key = store.key_for_secret(secret=secret.strip())
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key.id

    def own(request: Request) -> tuple[str | None, str]:
        """(the filter for lookups, the owner of what the request creates)."""
        key = caller(request)
        return key, key or LOCAL_OWNER

    def owned_file(file_id: str, key: str | None, param: str | None = None) -> db.File:
        found = store.get_file(file_id, owner=key) if ID_PATTERNS["file"].fullmatch(file_id) else None
        if found is None:
            raise not_found("file", file_id, param)
        return found

    def owned_job(job_id: str, key: str | None) -> db.Job:
        found = store.get_job(job_id, owner=key) if ID_PATTERNS["job"].fullmatch(job_id) else None
        if found is None:
            raise not_found("fine-tuning job", job_id)
        return found

    # ----- files

    @app.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        _, owner = own(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + FORM_OVERHEAD:
            raise too_large()
        form = await request.form(max_files=1, max_fields=8)
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "Missing required parameter: 'file' (a multipart file part).", param="file")
        if not isinstance(purpose, str) or not purpose:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(400, f"Invalid purpose {purpose!r}: this server takes uploads for fine-tuning only "
                                "(purpose 'fine-tune').", param="purpose")
        name = display_name(upload.filename)
        if not name.lower().endswith(".jsonl"):
            raise ApiError(400, f"Invalid file format for fine-tuning: {name!r}. Only .jsonl files are accepted.",
                           param="file")
        size = upload.size or 0
        if size > settings.max_upload_bytes:
            raise too_large()
        if size == 0:
            raise ApiError(400, f"The file {name!r} is empty.", param="file")
        file_id = db.new_id("file-")
        # the copy and its fsync run on a thread: a large upload must not hold up the other requests
        await run_in_threadpool(store_upload, upload, files_dir / file_id, size)
        await upload.close()
        made = store.create_file(id=file_id, owner=owner, filename=name, purpose=purpose, bytes=size)
        return file_object(made).model_dump(mode="json")

    def too_large() -> ApiError:
        limit = settings.max_upload_bytes
        return ApiError(413, f"The file is larger than this server's upload limit of {limit} bytes "
                             f"({limit / 2**20:.0f} MiB).", param="file", code="file_too_large")

    @app.get("/v1/files")
    def list_files(request: Request, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                   order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> dict[str, Any]:
        key, _ = own(request)
        return page_object(store.list_files(owner=key, purpose=purpose, after=after, limit=limit, order=order),
                           file_object)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
        key, _ = own(request)
        return file_object(owned_file(file_id, key)).model_dump(mode="json")

    @app.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str) -> FileResponse:
        key, _ = own(request)
        found = owned_file(file_id, key)
        return FileResponse(files_dir / found.storage_name, media_type="application/octet-stream",
                            filename=found.filename)

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        key, _ = own(request)
        owned_file(file_id, key)
        deleted = store.delete_file(file_id, owner=key)
        if deleted is None:
            raise not_found("file", file_id)
        remove(files_dir / deleted.storage_name)
        return schemas.FileDeleted(id=file_id).model_dump(mode="json")

    # ----- fine-tuning jobs

    @app.post("/v1/fine_tuning/jobs")
    def create_job(request: Request, body: schemas.CreateJobRequest) -> dict[str, Any]:
        key, owner = own(request)
        if body.model not in settings.base_models:
            raise ApiError(400, f"Model {body.model!r} is not available for fine-tuning on this server; it offers: "
                                f"{', '.join(settings.base_models)}", param="model", code="model_not_found")
        if body.integrations:
            raise ApiError(400, "integrations are not supported by this server (its dashboard shows the job's "
                                "curves)", param="integrations")
        training = fine_tune_file(body.training_file, key, "training_file")
        if body.validation_file is not None:
            fine_tune_file(body.validation_file, key, "validation_file")
        try:
            resolved = jobs.resolve_hyperparameters(body, count_examples(files_dir / training.storage_name))
        except jobs.InvalidRequest as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
        job = store.create_job(owner=owner, model=body.model, training_file=body.training_file,
                               validation_file=body.validation_file, method=resolved.method_json(),
                               hyperparameters=resolved.hyperparameters(), suffix=body.suffix,
                               seed=body.seed if body.seed is not None else jobs.new_seed(), metadata=body.metadata)
        store.add_event(job.id, level="info", message=f"Created fine-tuning job: {job.id}")
        store.add_event(job.id, level="info", message=f"Validating training file: {body.training_file}"
                        + (f" and validation file: {body.validation_file}" if body.validation_file else ""))
        return job_object(job).model_dump(mode="json")

    def fine_tune_file(file_id: str, key: str | None, param: str) -> db.File:
        found = store.get_file(file_id, owner=key) if ID_PATTERNS["file"].fullmatch(file_id) else None
        if found is None:
            raise ApiError(400, f"Invalid file ID: {file_id!r} — no such file.", param=param, code="invalid_file_id")
        if found.purpose != "fine-tune":
            raise ApiError(400, f"File {file_id} has purpose {found.purpose!r}; a job's files must have purpose "
                                "'fine-tune'.", param=param, code="invalid_file_purpose")
        return found

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        key, _ = own(request)
        page = store.list_jobs(owner=key, after=after, limit=limit, metadata=metadata_filter(request))
        return page_object(page, job_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(request: Request, job_id: str) -> dict[str, Any]:
        key, _ = own(request)
        return job_object(owned_job(job_id, key)).model_dump(mode="json")

    def act(request: Request, job_id: str, action: Literal["cancel", "pause", "resume"]) -> dict[str, Any]:
        key, _ = own(request)
        owned_job(job_id, key)
        try:
            job = store.request(job_id, action)
        except db.Conflict as exc:
            raise ApiError(409, str(exc), code="invalid_job_state") from None
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return job_object(job).model_dump(mode="json")

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        return act(request, job_id, "cancel")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(request: Request, job_id: str) -> dict[str, Any]:
        return act(request, job_id, "pause")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(request: Request, job_id: str) -> dict[str, Any]:
        return act(request, job_id, "resume")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(request: Request, job_id: str, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
        key, _ = own(request)
        owned_job(job_id, key)
        return page_object(store.list_events(job_id, after=after, limit=limit), event_object)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(request: Request, job_id: str, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
        key, _ = own(request)
        owned_job(job_id, key)
        return page_object(store.list_checkpoints(job_id, after=after, limit=limit), checkpoint_object)

    # ----- models

    def fine_tuned_jobs(key: str | None) -> list[db.Job]:
        found, after = [], None
        while True:
            page = store.list_jobs(owner=key, status="succeeded", after=after, limit=100)
            found += [j for j in page.items if j.fine_tuned_model]
            if not page.has_more:
                return found
            after = page.items[-1].id

    def base_object(name: str) -> schemas.Model:
        return schemas.Model(id=name, created=started, owned_by="tunesmith")

    def tuned_object(job: db.Job) -> schemas.Model:
        return schemas.Model(id=job.fine_tuned_model or "", created=job.finished_at or job.created_at,
                             owned_by=f"org-{job.owner}")

    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        key, _ = own(request)
        models = [base_object(m) for m in settings.base_models] + [tuned_object(j) for j in fine_tuned_jobs(key)]
        return schemas.ModelList(data=models).model_dump(mode="json")

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
        key, _ = own(request)
        if model_id in settings.base_models:
            return base_object(model_id).model_dump(mode="json")
        job = tuned_job(model_id, key)
        if job is None:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return tuned_object(job).model_dump(mode="json")

    def tuned_job(name: str, key: str | None) -> db.Job | None:
        """The succeeded job whose fine-tuned model is ``name`` (its id is the name's last part)."""
        job_id = name.rsplit(":", 1)[-1]
        job = store.get_job(job_id, owner=key) if name.startswith("ft:") and ID_PATTERNS["job"].fullmatch(
            job_id) else None
        return job if job is not None and job.status == "succeeded" and job.fine_tuned_model == name else None

    def model_spec(name: str) -> ModelSpec | None:
        """What serves ``name`` for chat: a base model through transformers, a fine-tuned one from its artefacts
        (the GGUF the job exported, else its merged model, else its adapter on the base)."""
        if name in settings.base_models:
            return ModelSpec(name, "transformers", name)
        job = tuned_job(name, None)
        if job is None:
            return None
        ggufs = job.artefacts.get("gguf") or []  # one per exported quantization, in the config's order
        if ggufs:
            return spec_for_artefact(settings.data_dir / ggufs[0], name=name, base=job.model)
        for kind in ("merged", "adapter"):
            if job.artefacts.get(kind):
                return spec_for_artefact(settings.data_dir / job.artefacts[kind], name=name, base=job.model)
        return spec_for_artefact(settings.data_dir / job.out_dir, name=name, base=job.model)

    # ----- the other halves: chat completions and the dashboard

    registry = Registry(resolve=model_spec)
    app.state.registry = registry
    app.include_router(chat_api.router(registry, dependencies=[caller]))
    app.include_router(dashboard.router(store=store, data_dir=settings.data_dir, owner=caller))
    return app
