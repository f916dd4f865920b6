"""The documented DashScope error codes, and the error value the emulator answers with.

Section 4.2 of the API contract lists the codes an image call can fail with, each with its HTTP
status. This module is that table, so that validation, fault injection and tests all speak the
same codes, statuses and messages. Messages are the documented ones where the contract quotes one
and a plausible paraphrase of its meaning otherwise.

It is pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["ERROR_CODES", "ApiError", "api_error", "new_request_id"]

#: code -> (HTTP status, default message), after section 4.2 of the contract.
ERROR_CODES: dict[str, tuple[int, str]] = {
    # 400
    "InvalidParameter": (400, "The request parameter is invalid."),
    "DataInspectionFailed": (400, "Input data may contain inappropriate content."),
    "data_inspection_failed": (400, "Input data may contain inappropriate content."),
    "IPInfringementSuspect": (
        400,
        "Input data is suspected of being involved in IP infringement.",
    ),
    "Arrearage": (400, "Access denied, please make sure your account is in good standing."),
    "BadRequest.EmptyInput": (400, 'Required parameter "input" missing from request.'),
    "BadRequest.EmptyParameters": (400, 'Required parameter "parameters" missing from request.'),
    "BadRequest.EmptyModel": (400, 'Required parameter "model" missing from request.'),
    "BadRequest.IllegalInput": (400, "The request body is not valid JSON."),
    "InvalidURL": (400, "The input URL is invalid."),
    "InvalidParameter.DataInspection": (400, "Failed to inspect the input data."),
    "BadRequest.InputDownloadFailed": (400, "Failed to download the input file."),
    # 401
    "InvalidApiKey": (401, "Invalid API-key provided."),
    "invalid_api_key": (401, "Invalid API-key provided."),
    "NOT AUTHORIZED": (401, "The workspace is not authorized for this endpoint."),
    # 403
    "AccessDenied": (403, "Access denied."),
    "AccessDenied.Unpurchased": (
        403,
        "Access to model denied. Please make sure you are eligible for using the model.",
    ),
    "Model.AccessDenied": (403, "Model access denied."),
    "Workspace.AccessDenied": (403, "Workspace access denied."),
    "App.AccessDenied": (403, "App access denied."),
    "AllocationQuota.FreeTierOnly": (
        403,
        "The free tier of the model has been exhausted and 'use free tier only' is on.",
    ),
    # 404
    "ModelNotFound": (404, "Model not found."),
    "model_not_found": (404, "Model not found."),
    "WorkSpaceNotFound": (404, "Workspace not found."),
    "NotFound": (404, "Not found."),
    # 408 in the older table, 500 on the newer page: the newer reading is used.
    "RequestTimeOut": (500, "Request timed out, please try again later."),
    # 413
    "BadRequest.TooLarge": (413, "Payload too large."),
    # 429
    "Throttling": (429, "Requests throttling triggered."),
    "Throttling.RateQuota": (429, "Requests rate limit exceeded, please try again later."),
    "LimitRequests": (429, "Requests rate limit exceeded, please try again later."),
    "limit_requests": (429, "Requests rate limit exceeded, please try again later."),
    "Throttling.BurstRate": (
        429,
        "Request rate increased too quickly, please reduce the rate of increase.",
    ),
    "limit_burst_rate": (
        429,
        "Request rate increased too quickly, please reduce the rate of increase.",
    ),
    "Throttling.AllocationQuota": (
        429,
        "Allocated quota exceeded, please increase your quota limit.",
    ),
    "insufficient_quota": (429, "Allocated quota exceeded, please increase your quota limit."),
    "CommodityNotPurchased": (429, "Commodity has not been purchased."),
    "PrepaidBillOverdue": (429, "The prepaid bill is overdue."),
    "PostpaidBillOverdue": (429, "The postpaid bill is overdue."),
    # 500
    "InternalError": (500, "An internal error has occurred, please try again later."),
    "internal_error": (500, "An internal error has occurred, please try again later."),
    "InternalError.Algo": (500, "An error occurred in model serving, please try again later."),
    "InternalError.Timeout": (500, "The task did not finish in time."),
    "InternalError.Upload": (500, "Failed to upload the result."),
    "InternalError.FileUpload": (500, "Failed to upload the result file."),
    "SystemError": (500, "A system error has occurred, please try again later."),
    "ModelServiceFailed": (500, "Failed to call the model service."),
    "RewriteFailed": (500, "Failed to rewrite the prompt."),
    # 503
    "ModelUnavailable": (503, "Model is unavailable, please try again later."),
    "ModelServingError": (
        503,
        "Too many requests. Your requests are being throttled due to system capacity limits. "
        "Please try again later.",
    ),
}


def new_request_id() -> str:
    """A fresh UUID-style request id (8-4-4-4-12 hex), as the service sends."""
    return str(uuid.uuid4())


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiError:
    """An error answer in the section 4.1 envelope: HTTP status plus ``code`` and ``message``."""

    status: int
    code: str
    message: str

    def body(self, request_id: str) -> dict[str, Any]:
        """The JSON body: ``{"request_id", "code", "message"}``."""
        return {"request_id": request_id, "code": self.code, "message": self.message}


def api_error(code: str, message: str | None = None) -> ApiError:
    """The documented error ``code`` with its status, and ``message`` or the default one.

    >>> api_error("InvalidParameter", "num_images_per_prompt must be 1").status
    400
    """
    status, default = ERROR_CODES[code]
    return ApiError(status=status, code=code, message=message or default)
