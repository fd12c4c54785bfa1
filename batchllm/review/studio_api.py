"""Label Studio's REST API, as much of it as a review needs: find or create a project, list the
row_ids its tasks hold, import tasks, export annotations. Its errors are translated here, once:
unreachable or 5xx -> ``StudioError`` (exit 75), a refused key -> ``StudioKeyError`` (exit 4),
anything else it refuses -> ``JobError`` (exit 2). The key is never part of a message.

The key (``LABEL_STUDIO_API_KEY``) is a legacy token (``Authorization: Token ...``), or a
personal access token, a JWT refresh token exchanged at ``/api/token/refresh`` for an access
token sent as ``Bearer``, the way Label Studio documents it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from ..errors import JobError, StudioError, StudioKeyError

KEY_ENV = "LABEL_STUDIO_API_KEY"
PAGE = 1000  # tasks a page, and a task import's size
TIMEOUT = 120.0
MAX_PAGES = 10_000  # a bound on paging (ten million tasks)


def studio_key() -> str:
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise JobError(f"no Label Studio key: set {KEY_ENV} (a legacy token, or a personal access token)")
    return key


class Studio:
    def __init__(self, url: str, key: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise JobError(f"{url!r} is not a Label Studio URL (http://host:port)")
        self.base = url.rstrip("/")
        self._auth = f"Token {key}"
        if key.count(".") == 2:  # a personal access token: a refresh token for an access token
            access = self._call("POST", "/api/token/refresh", {"refresh": key}).get("access")
            if not isinstance(access, str):
                raise StudioKeyError(
                    f"Label Studio at {self.base} gave no access token for the key in {KEY_ENV}"
                )
            self._auth = f"Bearer {access}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()[:300].decode("utf-8", "replace").replace("\n", " ")
            if exc.code in (401, 403):
                raise StudioKeyError(
                    f"Label Studio at {self.base} refused the key in {KEY_ENV} (HTTP {exc.code}); nothing was changed"
                ) from None
            if exc.code >= 500:
                raise StudioError(
                    f"Label Studio at {self.base} failed (HTTP {exc.code}); try again later"
                ) from None
            raise JobError(
                f"Label Studio at {self.base}: {method} {path.split('?')[0]}: HTTP {exc.code}: {text}"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StudioError(
                f"Label Studio at {self.base} is unreachable ({reason}); try again later"
            ) from None
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise StudioError(
                f"Label Studio at {self.base} sent a body that is not JSON ({path.split('?')[0]})"
            ) from None

    def project(self, title: str, config: str | None = None) -> int | None:
        """The id of the project with this title; created with ``config`` when there is none
        (without ``config``: None)."""
        path = "/api/projects/?page_size=100"
        for _ in range(MAX_PAGES):
            page = self._call("GET", path)
            for p in page.get("results", []):
                if p.get("title") == title:
                    return int(p["id"])
            following = page.get("next")
            if not following:
                break
            parts = urllib.parse.urlsplit(following)
            path = f"{parts.path}?{parts.query}"
        if config is None:
            return None
        return int(self._call("POST", "/api/projects/", {"title": title, "label_config": config})["id"])

    def row_ids(self, project: int) -> set[str]:
        """The row_ids the project's tasks hold."""
        out: set[str] = set()
        for page in range(1, MAX_PAGES + 1):
            got = self._call("GET", f"/api/tasks/?project={project}&page_size={PAGE}&page={page}")
            tasks = got.get("tasks", []) if isinstance(got, dict) else got
            out.update(str(t["data"]["row_id"]) for t in tasks if "row_id" in (t.get("data") or {}))
            total = got.get("total", 0) if isinstance(got, dict) else 0
            if len(tasks) < PAGE or page * PAGE >= total:
                break
        return out

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        for start in range(0, len(tasks), PAGE):
            self._call("POST", f"/api/projects/{project}/import", tasks[start : start + PAGE])
        return len(tasks)

    def export(self, project: int) -> list[dict[str, Any]]:
        """The project's tasks with their annotations (Label Studio's JSON export)."""
        tasks = self._call("GET", f"/api/projects/{project}/export?exportType=JSON")
        return tasks if isinstance(tasks, list) else []

    def people(self) -> dict[int, str]:
        """User ids -> emails (an export names reviewers by id)."""
        users = self._call("GET", "/api/users/")
        listed = users.get("results", []) if isinstance(users, dict) else users or []
        return {int(u["id"]): str(u.get("email") or u["id"]) for u in listed if "id" in u}
