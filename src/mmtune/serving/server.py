"""An HTTP server for a bundle (FastAPI + uvicorn): ``mmtune serve --run DIR``.

``POST /predict`` (one row: JSON, or a multipart form with file uploads), ``POST /predict/batch``
(``{"rows": [...]}``), ``POST /embed``, ``GET /health``, ``GET /metadata``; OpenAPI docs at ``/docs``.
A row is a JSON object keyed by the manifest's column names: text and numbers as they are, a file column
(image, audio) as base64 — or, only when the server allows paths, ``{"path": "/file/on/the/server"}``.

Every mistake a client can make is a 4xx naming the field and the reason, never a 500. Concurrent
requests are micro-batched: rows that arrive within ``batch_window_ms`` of each other (up to
``max_batch_rows``) run as one batch, so a loaded server runs at close to batch-prediction speed."""

import asyncio
import base64
import binascii
from dataclasses import dataclass
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd


@dataclass
class ServeSettings:
    max_request_rows: int = 256
    """Rows one /predict/batch or /embed request may hold."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body."""
    max_text_chars: int = 20_000
    """Longest text value."""
    max_pixels: int = 40_000_000
    """Largest image (width × height), checked before it is decoded (decompression bombs)."""
    max_request_pixels: int = 64_000_000
    """Pixels all the images of one request may hold together (and of one micro-batch): what bounds the memory
    a request's decoded images take, whatever their compressed size."""
    max_pixels_in_flight: int = 256_000_000
    """Pixels all requests in flight may hold together; a request that would pass it is answered 503."""
    allow_paths: Optional[str] = None
    """A folder: accept ``{"path": ...}`` for file columns, for files under it (symlinks resolved). None: no
    value ever names a file on the server."""
    batching: bool = True
    """Micro-batch concurrent requests."""
    batch_window_ms: float = 4.0
    """How long the first request of a batch waits for others."""
    max_batch_rows: int = 64
    """Rows per model call when batching."""
    search_index: Optional[str] = None
    """A matcher: the folder of a saved search index (``mmtune search --save-index``) that ``/search`` answers from."""


class RequestProblem(Exception):
    """A bad request: ``status`` and a message naming the field and the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PixelBudget:
    """The decoded pixels a server holds: each request's images are counted as their headers are read (before
    they are decoded); one request may hold ``per_request``, all requests in flight together ``in_flight``. A
    request over its own limit is a 413; one that would take the server over its total waits for nothing and is
    answered 503 (try again), so a burst of large images cannot exhaust memory."""

    def __init__(self, per_request: int, in_flight: int):
        import threading

        self.per_request, self.in_flight = per_request, max(in_flight, per_request)
        self.held = 0
        self._lock = threading.Lock()

    def claim(self) -> "PixelClaim":
        return PixelClaim(self)


class PixelClaim:
    """One request's share of a :class:`PixelBudget`; :meth:`release` when its answer is computed."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels = budget, 0

    def add(self, n: int, label: str) -> None:
        b = self.budget
        if self.pixels + n > b.per_request:
            raise RequestProblem(413, f"{label}: the request's images hold {self.pixels + n} pixels together, more "
                                      f"than the limit of {b.per_request} per request; send fewer rows per request "
                                      "or smaller images")
        with b._lock:
            if b.held + n > b.in_flight:
                raise RequestProblem(503, f"{label}: the server holds as many decoded images as it may "
                                          f"({b.in_flight} pixels); try again shortly")
            b.held += n
        self.pixels += n

    def release(self) -> None:
        with self.budget._lock:
            self.budget.held -= self.pixels
        self.pixels = 0


def _text_problem(v: str) -> Optional[str]:
    """Why a string cannot be text (a lone surrogate cannot be encoded as UTF-8), or None."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode (a lone surrogate {v[exc.start]!r} at character {exc.start})"
    return None


class RowReader:
    """Turns request rows (JSON objects, or form fields and uploads) into a DataFrame the Predictor takes,
    decoding file columns in memory. A value never names a file on the server unless the operator allowed a
    folder (``allow_paths``), and then only files under it."""

    def __init__(self, predictor, settings: ServeSettings):
        from ..modalities import modality_of

        self.settings = settings
        self.pixels = PixelBudget(settings.max_request_pixels, settings.max_pixels_in_flight)
        data = predictor.config.data
        self.file_columns: Dict[str, Any] = {}
        self.file_reads: Dict[str, Dict[str, Any]] = {}
        """Per file column, how its files are read: an upload is decoded as prediction reads files
        (``Predictor.reads``)."""
        self.text_columns: List[str] = []
        self.value_columns: List[str] = []
        for field in predictor.modalities:
            col = data.column(field)
            entry = modality_of(field)
            cols = col if isinstance(col, list) else [col]
            if entry.files:
                self.file_columns.update({c: entry for c in cols})
                if predictor.reads.get(field):
                    self.file_reads.update({c: predictor.reads[field] for c in cols})
            elif entry.free_text:
                self.text_columns.extend(cols)
            else:
                self.value_columns.extend(cols)
        self.id_column = data.id_column
        self.columns = [*self.file_columns, *self.text_columns, *self.value_columns]

    def empty_frame(self, rows: List[Dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=[*([self.id_column] if self.id_column else []), *self.columns])

    def frame(self, rows: List[Dict[str, Any]], claim: PixelClaim, where: str = "rows") -> pd.DataFrame:
        if not isinstance(rows, list):
            raise RequestProblem(422, f"{where}: expected a list of row objects")
        if len(rows) > self.settings.max_request_rows:
            raise RequestProblem(413, f"{where}: {len(rows)} rows, more than the limit of {self.settings.max_request_rows} "
                                      "per request; split the batch")
        if not rows:
            raise RequestProblem(422, f"{where}: no rows")
        out = []
        for i, row in enumerate(rows):
            label = f"{where}[{i}]" if len(rows) > 1 or where != "row" else "row"
            out.append(self.row(row, label, claim, i))
        return self.empty_frame(out)

    def row(self, row: Any, label: str, claim: PixelClaim, position: int = 0) -> Dict[str, Any]:
        """One request row as a manifest row; a row without the id column gets its position in the request."""
        if not isinstance(row, dict):
            raise RequestProblem(422, f"{label}: expected a JSON object keyed by column name ({', '.join(self.columns)})")
        unknown = sorted(set(row) - set(self.columns) - {self.id_column})
        if unknown:
            shown = ", ".join(repr(u) if _text_problem(u) is None else ascii(u) for u in unknown)
            raise RequestProblem(422, f"{label}: unknown column(s) {shown}; this model reads {', '.join(self.columns)}")
        out: Dict[str, Any] = {}
        if self.id_column:
            v = row.get(self.id_column)
            if isinstance(v, (dict, list)):
                raise RequestProblem(422, f"{label}.{self.id_column}: expected a number or a string, got {type(v).__name__}")
            if isinstance(v, str) and _text_problem(v):
                raise RequestProblem(422, f"{label}.{self.id_column}: {_text_problem(v)}")
            out[self.id_column] = v if v is not None else position
        for c, entry in self.file_columns.items():
            out[c] = self.file_value(row.get(c), entry, f"{label}.{c}", claim, self.file_reads.get(c))
        for c in self.text_columns:
            v = row.get(c)
            if v is not None and not isinstance(v, str):
                raise RequestProblem(422, f"{label}.{c}: expected a string, got {type(v).__name__}")
            if v is not None and len(v) > self.settings.max_text_chars:
                raise RequestProblem(413, f"{label}.{c}: {len(v)} characters, more than the limit of "
                                          f"{self.settings.max_text_chars}")
            if v is not None and _text_problem(v):
                raise RequestProblem(422, f"{label}.{c}: {_text_problem(v)}")
            out[c] = v
        for c in self.value_columns:
            v = row.get(c)
            if isinstance(v, (dict, list)):
                raise RequestProblem(422, f"{label}.{c}: expected a number or a string, got {type(v).__name__}")
            if isinstance(v, str) and len(v) > self.settings.max_text_chars:
                raise RequestProblem(413, f"{label}.{c}: {len(v)} characters, more than the limit of "
                                          f"{self.settings.max_text_chars}")
            if isinstance(v, str) and _text_problem(v):
                raise RequestProblem(422, f"{label}.{c}: {_text_problem(v)}")
            out[c] = v
        return out

    def file_value(self, v: Any, entry, label: str, claim: PixelClaim, reads: Optional[Dict[str, Any]] = None):
        """A file column's value: base64 text (a data: URL too), or ``{"path": ...}`` where paths are allowed.
        Never a path given as plain text."""
        if v is None:
            return None
        if isinstance(v, dict):
            if set(v) != {"path"} or not isinstance(v["path"], str):
                raise RequestProblem(422, f"{label}: expected base64 text or {{\"path\": \"...\"}}")
            return self.file_at(v["path"], entry, label, claim, reads)
        if not isinstance(v, str):
            raise RequestProblem(422, f"{label}: expected base64 text, got {type(v).__name__}")
        try:
            data = base64.b64decode(v.split(",", 1)[1] if v.startswith("data:") else v, validate=True)
        except (binascii.Error, ValueError):
            raise RequestProblem(422, f"{label}: not valid base64 (a file column takes the file's bytes as base64 "
                                      "text, or a multipart upload)") from None
        return self.decode(data, entry, label, claim, reads=reads)

    def file_at(self, path: str, entry, label: str, claim: PixelClaim, reads: Optional[Dict[str, Any]] = None):
        """The file ``path`` names, read and decoded like an upload (the same size and pixel limits) — only under
        the folder the operator allowed, symlinks resolved. Outside it the answer is the same whether or not the
        file exists."""
        import os

        if not self.settings.allow_paths:
            raise RequestProblem(422, f"{label}: file paths are not accepted by this server (send the file as "
                                      "base64 or a multipart upload; or start it with --allow-paths DIR)")
        root = os.path.realpath(self.settings.allow_paths)
        outside = RequestProblem(422, f"{label}: the path is not a file under the folder this server reads files "
                                      "from; give a path under it (relative to it, or absolute)")
        if "\x00" in path or _text_problem(path):
            raise outside
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            raise outside
        size = os.path.getsize(real)
        if size > self.settings.max_body_bytes:
            raise RequestProblem(413, f"{label}: file of {size} bytes, more than the limit of "
                                      f"{self.settings.max_body_bytes}")
        with open(real, "rb") as fh:
            data = fh.read(self.settings.max_body_bytes + 1)
        return self.decode(data, entry, label, claim, name=path, reads=reads)

    def decode(self, data: bytes, entry, label: str, claim: PixelClaim, name: Optional[str] = None,
               reads: Optional[Dict[str, Any]] = None):
        """An upload decoded as its column's files are read (``reads``: :attr:`file_reads`)."""
        if not data:
            raise RequestProblem(422, f"{label}: empty file")
        if entry.counts_pixels:
            claim.add(self.image_pixels(data, label), label)
        try:
            return entry.decode(data, name=name or label, **(reads or {}))
        except ValueError as exc:
            raise RequestProblem(422, f"{label}: {exc}") from None

    def image_pixels(self, data: bytes, label: str) -> int:
        """An image's width × height from its header (nothing decoded), within the per-image limit."""
        import io
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:  # reads the header only
                    w, h = im.size
        except Image.DecompressionBombError as exc:
            raise RequestProblem(413, f"{label}: image too large ({exc})") from None
        except Exception as exc:  # Pillow raises many types for bytes that are not an image
            raise RequestProblem(422, f"{label}: not a readable image ({type(exc).__name__}: {exc})") from None
        if w * h > self.settings.max_pixels:
            raise RequestProblem(413, f"{label}: image of {w}×{h} = {w * h} pixels, more than the limit of "
                                      f"{self.settings.max_pixels}")
        return w * h


class MicroBatcher:
    """Runs ``fn(frame) -> list of results`` on batches of rows gathered from concurrent requests, one batch at a
    time on a worker thread. A request's rows always run together; a batch closes after ``window`` seconds, at
    ``max_rows`` rows or at ``max_pixels`` decoded image pixels (a request that would pass either starts the
    next batch)."""

    def __init__(self, fn, window: float, max_rows: int, max_pixels: Optional[int] = None):
        self.fn, self.window, self.max_rows, self.max_pixels = fn, window, max_rows, max_pixels
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self._held: Optional[tuple] = None

    async def submit(self, frame: pd.DataFrame, pixels: int = 0):
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((frame, fut, pixels))
        return await fut

    def _fits(self, rows: int, pixels: int, item) -> bool:
        return rows + len(item[0]) <= self.max_rows and (self.max_pixels is None or pixels + item[2] <= self.max_pixels)

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            first = self._held if self._held is not None else await self.queue.get()
            self._held = None
            items = [first]
            rows, pixels = len(first[0]), first[2]
            deadline = loop.time() + self.window
            while rows < self.max_rows:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if not self._fits(rows, pixels, item):
                    self._held = item  # the first of the next batch
                    break
                items.append(item)
                rows, pixels = rows + len(item[0]), pixels + item[2]
            frame = pd.concat([f for f, _, _ in items], ignore_index=True)
            try:
                results = await asyncio.to_thread(self.fn, frame)
            except Exception as exc:  # handed to each waiting request, which answers for it
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for f, fut, _ in items:
                if not fut.done():
                    fut.set_result(results[start:start + len(f)])
                start += len(f)

    async def close(self):
        if self.task is not None:
            self.task.cancel()


def _results(predictor, frame: pd.DataFrame) -> List[Dict[str, Any]]:
    """Per row: per task the prediction and (classification) the calibrated probability of each class."""
    from .predictor import decide

    ds = predictor.dataset(frame, with_labels=False)
    proba = predictor.proba_of(ds, None)
    per_task = {}
    for t in predictor.tasks:
        labels = decide(t, proba[t.name], predictor.calibration[t.name])
        per_task[t.name] = [
            {"prediction": _plain(labels[i])} if t.regression else
            {"prediction": _plain(labels[i]),
             "probabilities": {str(c): float(proba[t.name][i, j]) for j, c in enumerate(t.classes)}}
            for i in range(len(frame))]
    out = []
    for i in range(len(frame)):
        row = {t: per_task[t][i] for t in per_task} if len(per_task) > 1 else next(iter(per_task.values()))[i]
        if predictor.spec.id_column:
            row = {predictor.spec.id_column: _plain(frame[predictor.spec.id_column].iloc[i]), **row}
        out.append(row)
    return out


def _plain(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def create_app(predictor, settings: Optional[ServeSettings] = None):
    """The FastAPI app serving ``predictor`` (a :class:`~mmtune.serving.predictor.Predictor`)."""
    from ..extras import require

    fastapi = require("fastapi", "serve", "mmtune serve")
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from ..version import __version__
    from ..data.manifest import BadRowsError

    settings = settings or ServeSettings()
    reader = RowReader(predictor, settings)
    predictor.workers = 1 if settings.batching else predictor.workers  # rows of one batch decode on its thread
    batcher = MicroBatcher(lambda f: _results(predictor, f), settings.batch_window_ms / 1000.0, settings.max_batch_rows,
                           settings.max_request_pixels)
    lock = asyncio.Lock()

    async def run(frame: pd.DataFrame, claim: PixelClaim):
        try:
            if settings.batching:
                return await batcher.submit(frame, claim.pixels)
            async with lock:
                return await asyncio.to_thread(_results, predictor, frame)
        except BadRowsError as exc:
            raise RequestProblem(422, str(exc)) from None

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = fastapi.FastAPI(title="mmtune", version=__version__, lifespan=lifespan,
                          description=f"Predictions of the {predictor.backend} model in {predictor.run_dir}")

    @app.exception_handler(RequestProblem)
    async def _problem(request, exc: RequestProblem):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        said = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"detail": said or "invalid request"}, status_code=422)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > settings.max_body_bytes
            except ValueError:
                return JSONResponse({"detail": f"content-length {length!r} is not a number"}, status_code=400)
            if too_big:
                return JSONResponse({"detail": f"request body of {length} bytes, more than the limit of "
                                               f"{settings.max_body_bytes}"}, status_code=413)
        return await call_next(request)

    async def body_bytes(request: Request) -> bytes:
        """The body, counted as it arrives (a chunked body has no content-length): 413 at the first byte over."""
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > settings.max_body_bytes:
                raise RequestProblem(413, f"request body over the limit of {settings.max_body_bytes} bytes")
        return bytes(body)

    async def json_body(request: Request) -> Any:
        import json

        body = await body_bytes(request)
        try:
            return json.loads(body)
        except RecursionError:
            raise RequestProblem(400, "the body is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestProblem(400, f"the body is not valid JSON ({exc})") from None

    async def form_row(request: Request, claim: PixelClaim) -> Dict[str, Any]:
        """A multipart form's row. Uploads of file columns are decoded; a plain field of a file column is base64
        text, as in JSON — never a path."""
        body = await body_bytes(request)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as exc:  # a malformed multipart body
            raise RequestProblem(400, f"the multipart body cannot be read ({type(exc).__name__}: {exc})") from None
        row: Dict[str, Any] = {}
        decoded: Dict[str, Any] = {}
        for key, value in form.multi_items():
            if key not in reader.columns and key != reader.id_column:
                shown = repr(key) if _text_problem(key) is None else ascii(key)
                raise RequestProblem(422, f"row: unknown column {shown}; this model reads {', '.join(reader.columns)}")
            if key in row or key in decoded:
                raise RequestProblem(422, f"row.{key}: given more than once")
            if key in reader.file_columns:
                entry = reader.file_columns[key]
                if hasattr(value, "read"):  # an upload
                    data = await value.read()
                    decoded[key] = await asyncio.to_thread(reader.decode, data, entry, f"row.{key}", claim,
                                                           reads=reader.file_reads.get(key))
                else:
                    decoded[key] = await asyncio.to_thread(reader.file_value, value, entry, f"row.{key}", claim,
                                                           reader.file_reads.get(key))
            elif hasattr(value, "read"):
                raise RequestProblem(422, f"row.{key}: a file was uploaded for a column that is not a file column")
            else:
                row[key] = value
        plain = reader.row(row, "row", claim)
        plain.update({c: decoded.get(c) for c in reader.file_columns})
        return plain

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        return {
            "mmtune_version": __version__,
            "backend": predictor.backend,
            "ensemble": predictor.members,
            "modalities": list(predictor.modalities),
            "columns": {"files": list(reader.file_columns), "text": reader.text_columns, "values": reader.value_columns,
                        "id": reader.id_column},
            "missing_modalities_allowed": bool(predictor.config.data.allow_missing),
            "tasks": [{"name": t.name, "type": "regression" if t.regression else "multilabel" if t.multilabel else "classification",
                       "classes": None if t.regression else [_plain(c) for c in t.classes]} for t in predictor.tasks],
            "calibration": {t: c.to_json() for t, c in predictor.calibration.items()},
            "embedding_kinds": predictor.embedding_kinds,
            "limits": {"rows_per_request": settings.max_request_rows, "body_bytes": settings.max_body_bytes,
                       "text_chars": settings.max_text_chars, "image_pixels": settings.max_pixels,
                       "request_pixels": settings.max_request_pixels},
            "reads_server_files": bool(settings.allow_paths),
        }

    def rows_of(body: Any) -> Any:
        if not isinstance(body, dict) or "rows" not in body:
            raise RequestProblem(422, 'expected {"rows": [row, ...]}')
        return body["rows"]

    if getattr(predictor, "task", None) == "matching":
        _matching_routes(app, predictor, reader, settings, lock, json_body, rows_of)
        return app

    @app.post("/predict")
    async def predict(request: Request):
        """One row: a JSON object keyed by column name (files as base64), or a form (files as multipart uploads, or
        base64 text in a field)."""
        claim = reader.pixels.claim()
        try:
            if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                frame = reader.empty_frame([await form_row(request, claim)])
            else:
                frame = await asyncio.to_thread(reader.frame, [await json_body(request)], claim, "row")
            return (await run(frame, claim))[0]
        finally:
            claim.release()

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        """``{"rows": [row, ...]}``."""
        claim = reader.pixels.claim()
        try:
            rows = rows_of(await json_body(request))
            return {"predictions": await run(await asyncio.to_thread(reader.frame, rows, claim), claim)}
        finally:
            claim.release()

    @app.post("/embed")
    async def embed(request: Request):
        """``{"rows": [row, ...], "kind": "fused" | encoder name}`` -> ``{"kind", "embeddings": [[...], ...]}``
        (null for an encoder whose modality the row lacks)."""
        claim = reader.pixels.claim()
        try:
            body = await json_body(request)
            rows = rows_of(body)
            kind = body.get("kind", "fused")
            if not isinstance(kind, str) or kind not in predictor.embedding_kinds:
                shown = repr(kind) if isinstance(kind, str) and _text_problem(kind) is None else ascii(kind)
                raise RequestProblem(422, f"kind: {shown} is not an embedding of this model; valid: "
                                          f"{', '.join(predictor.embedding_kinds)}")
            frame = await asyncio.to_thread(reader.frame, rows, claim)
            try:
                async with lock:
                    table = await asyncio.to_thread(predictor.embed, frame, kind)
            except BadRowsError as exc:
                raise RequestProblem(422, str(exc)) from None
        finally:
            claim.release()
        vectors = table[[c for c in table.columns if c != predictor.spec.id_column]].to_numpy(dtype=np.float64)
        return {"kind": kind, "embeddings": [[None if x != x else float(x) for x in v] for v in vectors]}

    return app


def _matching_routes(app, predictor, reader, settings: ServeSettings, lock, json_body, rows_of) -> None:
    """A matcher's endpoints: ``/search`` (query rows -> the saved index's top k), ``/embed`` (either side) and
    ``/score`` (rows with both columns -> each pair's score)."""
    from fastapi import Request

    from ..data.manifest import BadRowsError
    from .matching import SearchIndex

    index = SearchIndex.load(settings.search_index) if settings.search_index else None

    async def frame_of(body, claim):
        return await asyncio.to_thread(reader.frame, rows_of(body), claim)

    async def call(fn, *args):
        try:
            async with lock:
                return await asyncio.to_thread(fn, *args)
        except BadRowsError as exc:
            raise RequestProblem(422, str(exc)) from None

    @app.post("/search")
    async def search(request: Request):
        """``{"rows": [query row, ...], "top_k": 10}`` -> ``{"hits": [[{rank, id, score, value}, ...], ...]}``."""
        if index is None:
            raise RequestProblem(409, "this server has no search index: start it with --index DIR (saved by "
                                      "`mmtune search --run RUN --corpus TABLE --save-index DIR`)")
        claim = reader.pixels.claim()
        try:
            body = await json_body(request)
            top_k = body.get("top_k", 10) if isinstance(body, dict) else 10
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1000:
                raise RequestProblem(422, f"top_k: expected a whole number from 1 to 1000, got {ascii(top_k)}")
            frame = await frame_of(body, claim)
            hits = await call(predictor.search, frame, index, top_k)
        finally:
            claim.release()
        out = [[] for _ in range(len(frame))]
        for h in hits.itertuples(index=False):
            out[h.query_row].append({"rank": int(h.rank), "id": h.id, "score": float(h.score), "value": h.value})
        return {"hits": out}

    @app.post("/embed")
    async def embed(request: Request):
        """``{"rows": [...], "side": "query" | "response"}`` -> ``{"side", "embeddings": [[...], ...]}``."""
        claim = reader.pixels.claim()
        try:
            body = await json_body(request)
            side = body.get("side", "query") if isinstance(body, dict) else "query"
            if side not in ("query", "response"):
                raise RequestProblem(422, f"side: expected 'query' or 'response', got {ascii(side)}")
            table = await call(predictor.embed, await frame_of(body, claim), side)
        finally:
            claim.release()
        return {"side": side, "embeddings": table.to_numpy(dtype=np.float64).tolist()}

    @app.post("/score")
    async def score(request: Request):
        """``{"rows": [row with both columns, ...]}`` -> ``{"scores": [{score[, probability]}, ...]}``."""
        claim = reader.pixels.claim()
        try:
            table = await call(predictor.score_pairs, await frame_of(await json_body(request), claim))
        finally:
            claim.release()
        return {"scores": [{k: float(v) for k, v in r.items()} for r in table.to_dict(orient="records")]}


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, backend: Optional[str] = None,
          device: str = "cpu", settings: Optional[ServeSettings] = None, ensemble: Optional[bool] = None) -> None:
    """Load the bundle and serve it with uvicorn until interrupted. ``workers`` > 1 starts that many processes
    (each with its own copy of the model) through uvicorn's own process manager. ``ensemble`` as in
    :meth:`~mmtune.Predictor.load` (a run's ensemble is served by default)."""
    from ..extras import require

    uvicorn = require("uvicorn", "serve", "mmtune serve")
    require("fastapi", "serve", "mmtune serve")
    import json
    import os

    from .predictor import Predictor

    settings = settings or ServeSettings()
    if workers > 1:
        os.environ["MMTUNE_SERVE"] = json.dumps({"run": str(run_dir), "backend": backend, "device": device,
                                                 "ensemble": ensemble, "settings": settings.__dict__})
        uvicorn.run("mmtune.serving.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
        return
    predictor = Predictor.load(run_dir, device=device, backend=backend, ensemble=ensemble)
    uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level="warning")


def app_from_environment():
    """The app of ``MMTUNE_SERVE`` (set by :func:`serve` for its worker processes)."""
    import json
    import os

    from .predictor import Predictor

    spec = json.loads(os.environ["MMTUNE_SERVE"])
    predictor = Predictor.load(spec["run"], device=spec["device"], backend=spec["backend"],
                               ensemble=spec.get("ensemble"))
    return create_app(predictor, ServeSettings(**spec["settings"]))
