"""The HTTP session of every S3 client the project makes (imported only for ``s3://`` URLs).

botocore asks for ``Expect: 100-continue`` on every PUT whose body is file-like, and aiohttp arms no read
timeout while it waits for the ``100 Continue``: a reply lost on the way (a stalled connection, a
half-open socket) then holds the request, and the command, forever. Without the header the body goes out
with the request and the per-read timeout (``read_timeout``) covers the whole wait for the answer, so a
lost reply becomes a timeout that botocore retries. The bodies are small (a shard, a chunk, a JSON file)
and sent at once; the header saves nothing here.
"""

from __future__ import annotations

from aiobotocore.httpsession import AIOHTTPSession


class S3HTTPSession(AIOHTTPSession):
    """aiobotocore's aiohttp session, sending every request without ``Expect: 100-continue``."""

    async def send(self, request):  # noqa: ANN001, ANN201 (aiobotocore's signature)
        if "Expect" in request.headers:
            del request.headers["Expect"]
        return await super().send(request)
