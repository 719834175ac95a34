"""The OpenAI objects the service reads and writes, as pydantic models (field names and literals as OpenAI's API).

Requests are strict (``extra="forbid"``): a misspelt field is a 400 naming it, never a silently ignored option.
Responses are what the ``openai`` client's own types expect, so a client with strict response validation accepts
them (except ``status: "paused"``, which OpenAI's pause endpoint returns but its status enum does not list).
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

Auto = Literal["auto"]
FilePurpose = Literal["assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
                      "vision", "user_data", "evals"]
JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SEED = 2_147_483_647


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- the create-job request -----------------------------------------------------------------------------------------

class Hyperparameters(Request):
    """Each is ``"auto"`` (the server picks, and reports the number back) or a number in OpenAI's range."""
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class SupervisedMethod(Request):
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoMethod(Request):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class Method(Request):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


def _metadata_ok(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} metadata pairs, got {len(value)}")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(f"metadata key {key[:20]!r}… is {len(key)} characters; at most {MAX_METADATA_KEY}")
        if len(item) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata value of {key!r} is {len(item)} characters; at most {MAX_METADATA_VALUE}")
    return value


class CreateJobRequest(Request):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    """Deprecated by OpenAI in favour of ``method``, still sent by older clients: supervised hyperparameters."""
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None

    _metadata = field_validator("metadata")(_metadata_ok)


# --- response objects -----------------------------------------------------------------------------------------------

class FileObject(Response):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(Response):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobError(Response):
    code: str
    message: str
    param: str | None = None


class ResolvedHyperparameters(Response):
    batch_size: int
    learning_rate_multiplier: float
    n_epochs: int


class ResolvedDpoHyperparameters(ResolvedHyperparameters):
    beta: float


class ResolvedMethod(Response):
    type: Literal["supervised", "dpo"]
    supervised: dict[Literal["hyperparameters"], ResolvedHyperparameters] | None = None
    dpo: dict[Literal["hyperparameters"], ResolvedDpoHyperparameters] | None = None


class FineTuningJob(Response):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: ResolvedMethod


class FineTuningJobEvent(Response):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(Response):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(Response):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class Model(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


T = TypeVar("T")


class ListPage(Response, Generic[T]):
    """A cursor page: the next one is asked for with ``after=<last_id>`` while ``has_more``."""
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(Response):
    error: ErrorDetail
