"""Signed image URLs shaped like Alibaba OSS ones, and OSS-style XML error bodies.

A real result URL looks like (section 8 of the contract)::

    https://dashscope-result-bj.oss-cn-beijing.aliyuncs.com/1d/ab/20261125/1a2b3c4d/<uuid>.png
        ?Expires=1764158400&OSSAccessKeyId=LTAI...&Signature=<url-encoded base64>

The emulator issues the same path and query on its own host. The signature is computed as OSS
(signature version 1) does for a pre-signed GET: base64 of HMAC-SHA1 over
``"GET\\n\\n\\n{Expires}\\n/{bucket}{path}"`` with a secret made at start-up. A changed path,
expiry or signature fails verification; an intact but old URL is expired.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote
from xml.sax.saxutils import escape

__all__ = ["UrlCheck", "UrlSigner", "image_path", "oss_error_xml"]

BUCKET = "dashscope-result-emulator"


class UrlCheck(StrEnum):
    """The outcome of checking a download URL."""

    OK = "ok"
    MISSING = "missing"  # no Expires/OSSAccessKeyId/Signature at all
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


def image_path(image_id: str, now: float) -> str:
    """The object path of an image: ``/1d/<2 hex>/<yyyymmdd>/<8 hex>/<image_id>.png``."""
    day = time.strftime("%Y%m%d", time.gmtime(now))
    return f"/1d/{image_id[-2:]}/{day}/{image_id[:8]}/{image_id}.png"


@dataclass(frozen=True, kw_only=True, slots=True)
class UrlSigner:
    """Signs and checks image URLs with ``secret`` under the access key id ``access_key_id``."""

    secret: bytes
    access_key_id: str

    def signature(self, path: str, expires: int) -> str:
        """The base64 HMAC-SHA1 signature of a GET of ``path`` valid until ``expires``."""
        to_sign = f"GET\n\n\n{expires}\n/{BUCKET}{path}".encode()
        return base64.b64encode(hmac.digest(self.secret, to_sign, hashlib.sha1)).decode()

    def query(self, path: str, expires: int) -> str:
        """The query string (without ``?``) that makes ``path`` downloadable until ``expires``."""
        signature = quote(self.signature(path, expires), safe="")
        return f"Expires={expires}&OSSAccessKeyId={self.access_key_id}&Signature={signature}"

    def check(
        self,
        path: str,
        expires: str | None,
        access_key_id: str | None,
        signature: str | None,
        now: float,
    ) -> UrlCheck:
        """Check a URL's decoded query values at time ``now``; the signature is checked first."""
        if expires is None and access_key_id is None and signature is None:
            return UrlCheck.MISSING
        if expires is None or signature is None or access_key_id != self.access_key_id:
            return UrlCheck.BAD_SIGNATURE
        if not expires.isascii() or not expires.isdigit():
            return UrlCheck.BAD_SIGNATURE
        expected = self.signature(path, int(expires))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return UrlCheck.BAD_SIGNATURE
        return UrlCheck.EXPIRED if now > int(expires) else UrlCheck.OK


def oss_error_xml(code: str, message: str, request_id: str, **extra: str) -> str:
    """An OSS error document: ``<Error><Code>...</Code><Message>...</Message>...</Error>``."""
    fields = {"Code": code, "Message": message, "RequestId": request_id, **extra}
    fields.setdefault("HostId", f"{BUCKET}.oss-emulator.local")
    body = "".join(f"  <{k}>{escape(v)}</{k}>\n" for k, v in fields.items())
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n{body}</Error>\n'
