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
    allow_paths: bool = False
    """Accept ``{"path": ...}`` for file columns (files on the server's disk)."""
    batching: bool = True
    """Micro-batch concurrent requests."""
    batch_window_ms: float = 4.0
    """How long the first request of a batch waits for others."""
    max_batch_rows: int = 64
    """Rows per model call when batching."""


class RequestProblem(Exception):
    """A bad request: ``status`` and a message naming the field and the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RowReader:
    """Turns request rows (JSON objects, or form fields and uploads) into a DataFrame the Predictor takes,
    decoding file columns in memory."""

    def __init__(self, predictor, settings: ServeSettings):
        from ..modalities import kind, modality_of

        self.settings = settings
        data = predictor.config.data
        self.file_columns: Dict[str, Any] = {}
        self.text_columns: List[str] = []
        self.value_columns: List[str] = []
        for field in predictor.modalities:
            col = data.column(field)
            entry = modality_of(field)
            cols = col if isinstance(col, list) else [col]
            if entry.files:
                self.file_columns.update({c: entry for c in cols})
            elif kind(field) == "text":
                self.text_columns.extend(cols)
            else:
                self.value_columns.extend(cols)
        self.id_column = data.id_column
        self.columns = [*self.file_columns, *self.text_columns, *self.value_columns]

    def frame(self, rows: List[Dict[str, Any]], where: str = "rows") -> pd.DataFrame:
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
            out.append(self.row(row, label, i))
        return pd.DataFrame(out, columns=[*([self.id_column] if self.id_column else []), *self.columns])

    def row(self, row: Any, label: str, position: int = 0) -> Dict[str, Any]:
        """One request row as a manifest row; a row without the id column gets its position in the request."""
        if not isinstance(row, dict):
            raise RequestProblem(422, f"{label}: expected a JSON object keyed by column name ({', '.join(self.columns)})")
        unknown = sorted(set(row) - set(self.columns) - {self.id_column})
        if unknown:
            raise RequestProblem(422, f"{label}: unknown column(s) {', '.join(map(repr, unknown))}; this model reads "
                                      f"{', '.join(self.columns)}")
        out: Dict[str, Any] = {}
        if self.id_column:
            out[self.id_column] = row[self.id_column] if row.get(self.id_column) is not None else position
        for c, entry in self.file_columns.items():
            out[c] = self.file_value(row.get(c), entry, f"{label}.{c}")
        for c in self.text_columns:
            v = row.get(c)
            if v is not None and not isinstance(v, str):
                raise RequestProblem(422, f"{label}.{c}: expected a string, got {type(v).__name__}")
            if v is not None and len(v) > self.settings.max_text_chars:
                raise RequestProblem(413, f"{label}.{c}: {len(v)} characters, more than the limit of "
                                          f"{self.settings.max_text_chars}")
            out[c] = v
        for c in self.value_columns:
            v = row.get(c)
            if isinstance(v, (dict, list)):
                raise RequestProblem(422, f"{label}.{c}: expected a number or a string, got {type(v).__name__}")
            out[c] = v
        return out

    def file_value(self, v: Any, entry, label: str):
        if v is None:
            return None
        if isinstance(v, dict):
            if set(v) != {"path"} or not isinstance(v["path"], str):
                raise RequestProblem(422, f"{label}: expected base64 text or {{\"path\": \"...\"}}")
            if not self.settings.allow_paths:
                raise RequestProblem(422, f"{label}: file paths are not accepted by this server (send the file as "
                                          "base64 or a multipart upload; or start it with --allow-paths)")
            return v["path"]
        if not isinstance(v, str):
            raise RequestProblem(422, f"{label}: expected base64 text, got {type(v).__name__}")
        try:
            data = base64.b64decode(v.split(",", 1)[1] if v.startswith("data:") else v, validate=True)
        except (binascii.Error, ValueError):
            raise RequestProblem(422, f"{label}: not valid base64") from None
        return self.decode(data, entry, label)

    def decode(self, data: bytes, entry, label: str):
        if not data:
            raise RequestProblem(422, f"{label}: empty file")
        if entry.name == "image":
            self.check_pixels(data, label)
        try:
            return entry.decode(data, name=label)
        except ValueError as exc:
            raise RequestProblem(422, f"{label}: {exc}") from None

    def check_pixels(self, data: bytes, label: str) -> None:
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


class MicroBatcher:
    """Runs ``fn(frame) -> list of results`` on batches of rows gathered from concurrent requests, one batch at a
    time on a worker thread. A request's rows always run together; a batch closes after ``window`` seconds or
    at ``max_rows`` rows."""

    def __init__(self, fn, window: float, max_rows: int):
        self.fn, self.window, self.max_rows = fn, window, max_rows
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None

    async def submit(self, frame: pd.DataFrame):
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((frame, fut))
        return await fut

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items = [first]
            rows = len(first[0])
            deadline = loop.time() + self.window
            while rows < self.max_rows:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                rows += len(item[0])
            frame = pd.concat([f for f, _ in items], ignore_index=True)
            try:
                results = await asyncio.to_thread(self.fn, frame)
            except Exception as exc:  # handed to each waiting request, which answers for it
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for f, fut in items:
                if not fut.done():
                    fut.set_result(results[start:start + len(f)])
                start += len(f)

    async def close(self):
        if self.task is not None:
            self.task.cancel()


def _results(predictor, frame: pd.DataFrame) -> List[Dict[str, Any]]:
    """Per row: per task the prediction and (classification) the calibrated probability of each class."""
    from .predictor import decide

    ds = predictor._dataset(frame, with_labels=False)
    proba = predictor._proba(ds, None)
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

    from .. import __version__
    from ..data.manifest import BadRowsError

    settings = settings or ServeSettings()
    reader = RowReader(predictor, settings)
    predictor.workers = 1 if settings.batching else predictor.workers  # rows of one batch decode on its thread
    batcher = MicroBatcher(lambda f: _results(predictor, f), settings.batch_window_ms / 1000.0, settings.max_batch_rows)
    lock = asyncio.Lock()

    async def run(frame: pd.DataFrame):
        try:
            if settings.batching:
                return await batcher.submit(frame)
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

    async def json_body(request: Request) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > settings.max_body_bytes:
                raise RequestProblem(413, f"request body over the limit of {settings.max_body_bytes} bytes")
        import json

        try:
            return json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestProblem(400, f"the body is not valid JSON ({exc})") from None

    async def form_row(request: Request) -> Dict[str, Any]:
        try:
            form = await request.form()
        except Exception as exc:  # a malformed multipart body
            raise RequestProblem(400, f"the multipart body cannot be read ({type(exc).__name__}: {exc})") from None
        row: Dict[str, Any] = {}
        for key, value in form.multi_items():
            if key not in reader.columns and key != reader.id_column:
                raise RequestProblem(422, f"row: unknown column {key!r}; this model reads {', '.join(reader.columns)}")
            if hasattr(value, "read"):  # an upload
                if key not in reader.file_columns:
                    raise RequestProblem(422, f"row.{key}: a file was uploaded for a column that is not a file column")
                data = await value.read()
                row[key] = reader.decode(data, reader.file_columns[key], f"row.{key}")
            else:
                row[key] = value
        decoded = {k: v for k, v in row.items() if k in reader.file_columns}
        plain = reader.row({k: v for k, v in row.items() if k not in reader.file_columns}, "row")
        for c in reader.file_columns:
            plain[c] = decoded.get(c)
        return plain

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata():
        return {
            "mmtune_version": __version__,
            "backend": predictor.backend,
            "modalities": list(predictor.modalities),
            "columns": {"files": list(reader.file_columns), "text": reader.text_columns, "values": reader.value_columns,
                        "id": reader.id_column},
            "missing_modalities_allowed": bool(predictor.config.data.allow_missing),
            "tasks": [{"name": t.name, "type": "regression" if t.regression else "multilabel" if t.multilabel else "classification",
                       "classes": None if t.regression else [_plain(c) for c in t.classes]} for t in predictor.tasks],
            "calibration": {t: c.to_json() for t, c in predictor.calibration.items()},
            "embedding_kinds": predictor.embedding_kinds,
            "limits": {"rows_per_request": settings.max_request_rows, "body_bytes": settings.max_body_bytes,
                       "text_chars": settings.max_text_chars, "image_pixels": settings.max_pixels},
        }

    @app.post("/predict")
    async def predict(request: Request):
        """One row: a JSON object keyed by column name (files as base64), or a multipart form (files as uploads)."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            frame = pd.DataFrame([await form_row(request)], columns=[*([reader.id_column] if reader.id_column else []), *reader.columns])
        else:
            frame = await asyncio.to_thread(reader.frame, [await json_body(request)], "row")
        return (await run(frame))[0]

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        """``{"rows": [row, ...]}``."""
        body = await json_body(request)
        if not isinstance(body, dict) or "rows" not in body:
            raise RequestProblem(422, 'expected {"rows": [row, ...]}')
        return {"predictions": await run(await asyncio.to_thread(reader.frame, body["rows"]))}

    @app.post("/embed")
    async def embed(request: Request):
        """``{"rows": [row, ...], "kind": "fused" | encoder name}`` -> ``{"kind", "embeddings": [[...], ...]}``
        (null for an encoder whose modality the row lacks)."""
        body = await json_body(request)
        if not isinstance(body, dict) or "rows" not in body:
            raise RequestProblem(422, 'expected {"rows": [row, ...], "kind": "fused"}')
        kind = body.get("kind", "fused")
        if kind not in predictor.embedding_kinds:
            raise RequestProblem(422, f"kind: {kind!r} is not an embedding of this model; valid: "
                                      f"{', '.join(predictor.embedding_kinds)}")
        frame = await asyncio.to_thread(reader.frame, body["rows"])
        try:
            async with lock:
                table = await asyncio.to_thread(predictor.embed, frame, kind)
        except BadRowsError as exc:
            raise RequestProblem(422, str(exc)) from None
        vectors = table[[c for c in table.columns if c != predictor.spec.id_column]].to_numpy(dtype=np.float64)
        return {"kind": kind, "embeddings": [[None if x != x else float(x) for x in v] for v in vectors]}

    return app


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, backend: Optional[str] = None,
          device: str = "cpu", settings: Optional[ServeSettings] = None) -> None:
    """Load the bundle and serve it with uvicorn until interrupted. ``workers`` > 1 starts that many processes
    (each with its own copy of the model) through uvicorn's own process manager."""
    from ..extras import require

    uvicorn = require("uvicorn", "serve", "mmtune serve")
    require("fastapi", "serve", "mmtune serve")
    import json
    import os

    from .predictor import Predictor

    settings = settings or ServeSettings()
    if workers > 1:
        os.environ["MMTUNE_SERVE"] = json.dumps({"run": str(run_dir), "backend": backend, "device": device,
                                                 "settings": settings.__dict__})
        uvicorn.run("mmtune.serving.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
        return
    predictor = Predictor.load(run_dir, device=device, backend=backend)
    uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level="warning")


def app_from_environment():
    """The app of ``MMTUNE_SERVE`` (set by :func:`serve` for its worker processes)."""
    import json
    import os

    from .predictor import Predictor

    spec = json.loads(os.environ["MMTUNE_SERVE"])
    predictor = Predictor.load(spec["run"], device=spec["device"], backend=spec["backend"])
    return create_app(predictor, ServeSettings(**spec["settings"]))
