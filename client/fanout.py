"""One population over several endpoints: ``FanoutClient`` has ``ClipClient``'s surface, so ``RemoteTask``
(client/objective.py) and the one loop use it unchanged.

    infer(P candidates)  ->  shares in proportion to each endpoint's measured candidates/s
                             [0, a) -> endpoint 1     [a, P) -> endpoint 2       (sent concurrently)
                         <-  outputs concatenated in candidate order (loss [P], logits [P, N, C])

Every candidate is scored by the same frozen model wherever it goes, so the result equals one endpoint's
(the endpoints must serve the same ``model_id``; ``model_metadata`` checks). A share whose endpoint fails
(connection, 503 or 429 after its client's retries, 5xx, its key's quota spent) is sent whole to the
fastest endpoint still up, under the same request id (``{id}@{start}-{stop}``), so endpoints that share
a ledger recognise a duplicate and do not charge it twice; the failed endpoint sits out ``cooldown_s``
and rejoins when it answers ready again. Request errors (4xx: a bad tensor, a bad key) are raised. The
budget stays exact: the loop counts candidates, not requests. ``report()`` gives each endpoint's share,
usage and throughput (summary.json's ``endpoints``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bptvlm.shared.errors import BptvlmError, BudgetExhaustedError, NotFoundError, ProtocolError
from bptvlm.shared.protocol import CLASS_NAMES, IMAGE_BATCH, IMAGES, LABELS, LOGITS, LOSS, ModelMetadata, PromptLimits, Usage, UsageReport

from .api import ClipClient, InferResult, add_usage

logger = logging.getLogger(__name__)

SHARED_INPUTS = (IMAGES, IMAGE_BATCH, LABELS, CLASS_NAMES)  # the same for every candidate; the rest lead with P
SMOOTHING = 0.5  # weight of the newest measurement in an endpoint's candidates/s
FANOUT_RETRY_S = 10.0  # each endpoint's own retry window: past it, its share goes to the others

# a request's parameters and its per-output parameters (ClipClient.infer's parameters, output_parameters)
_Parameters = tuple[Mapping[str, Any] | None, Mapping[str, Mapping[str, Any]] | None]


def split_endpoints(value: str | Sequence[str]) -> list[str]:
    """``"URL1,URL2"`` (or a list) -> the URLs; ``ValueError`` for an empty one."""
    urls = [u.strip() for u in (value.split(",") if isinstance(value, str) else value)]
    if not urls or any(not u for u in urls):
        raise ValueError(f"--endpoint {value!r} has an empty URL; give URL1,URL2,... without spaces or trailing commas")
    return urls


@dataclass
class EndpointStats:
    """One endpoint's part of the run so far."""

    endpoint: str
    candidates: int = 0  # scored and answered here
    requests: int = 0
    seconds: float = 0.0  # wall seconds of its answered requests
    failures: int = 0  # shares that failed here and went elsewhere
    usage: Usage = field(default_factory=Usage)  # what it reported charging
    rate: float | None = None  # smoothed candidates/s (None: not measured yet)
    down_until: float = 0.0  # monotonic time before which it is not used
    last_error: str | None = None

    def record(self, candidates: int, seconds: float, usage: Usage) -> None:
        self.candidates += candidates
        self.requests += 1
        self.seconds += seconds
        self.usage = add_usage(self.usage, usage)
        now = candidates / max(seconds, 1e-6)
        self.rate = now if self.rate is None else SMOOTHING * now + (1 - SMOOTHING) * self.rate

    def as_dict(self, total: int) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "candidates": self.candidates, "share": self.candidates / max(total, 1),
                "requests": self.requests, "seconds": round(self.seconds, 4), "failures": self.failures,
                "candidates_per_s": None if self.rate is None else round(self.rate, 3), "usage": self.usage.model_dump(),
                "last_error": self.last_error}


def apportion(population: int, weights: Sequence[float]) -> list[int]:
    """Split ``population`` into ``len(weights)`` counts proportional to ``weights`` (largest remainder;
    ties to the earlier endpoint); the counts sum to ``population``."""
    total = sum(weights)
    if not weights or total <= 0:
        raise ValueError("apportion needs at least one positive weight")
    exact = [population * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: population - sum(counts)]:
        counts[i] += 1
    return counts


def _endpoint_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the endpoint (not the request) failed: another endpoint may answer."""
    if isinstance(exc, (httpx.TransportError, BudgetExhaustedError)):
        return True
    return isinstance(exc, BptvlmError) and (exc.status_code >= 500 or exc.status_code == 429)


@dataclass
class _Share:
    start: int
    stop: int
    endpoint: int
    reuploaded: bool = False


class FanoutClient:
    """``ClipClient``'s surface over several endpoints of one model (see the module docstring). Owns the clients."""

    def __init__(self, clients: Sequence[ClipClient], *, cooldown_s: float = 30.0) -> None:
        if not clients:
            raise ValueError("FanoutClient needs at least one endpoint")
        endpoints = [c.endpoint for c in clients]
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"an endpoint is given twice: {', '.join(endpoints)}")
        self.clients = list(clients)
        self.cooldown_s = cooldown_s
        self.stats = [EndpointStats(c.endpoint) for c in clients]
        self.model = clients[0].model
        self._images: dict[str, np.ndarray] = {}  # image_batch id -> pixels, for re-uploads
        self._pool = ThreadPoolExecutor(len(clients), thread_name_prefix="fanout")

    # --- ClipClient's surface -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return ",".join(c.endpoint for c in self.clients)

    @property
    def usage(self) -> Usage:
        total = Usage()
        for c in self.clients:
            total = add_usage(total, c.usage)
        return total

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self.clients:
            c.close()

    def __enter__(self) -> FanoutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FanoutClient({self.endpoint!r}, model={self.model!r})"

    def check_server(self, refused_for: float = 0.0, interval: float = 0.5) -> None:
        for c in self.clients:
            c.check_server(refused_for, interval)

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        for c in self.clients:
            c.wait_until_ready(timeout, interval)

    def ready(self) -> bool:
        return any(c.ready() for c in self.clients)

    def model_metadata(self) -> ModelMetadata:
        """The first endpoint's metadata; ``ProtocolError`` unless every endpoint serves the same model."""
        metadata = [c.model_metadata() for c in self.clients]
        ids = [m.parameters.get("model_id") for m in metadata]
        if len(set(map(str, ids))) > 1:
            listing = ", ".join(f"{c.endpoint} serves {i}" for c, i in zip(self.clients, ids))
            raise ProtocolError(f"the endpoints serve different models ({listing}): one run needs one model")
        return metadata[0]

    def prompt_limits(self, metadata: ModelMetadata | None = None) -> PromptLimits:
        return self.clients[0].prompt_limits(metadata)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.clients[0].count_tokens(texts)

    def usage_report(self) -> UsageReport | None:
        """Usage summed over the endpoints; ``remaining`` None when any endpoint has no quota."""
        reports = [c.usage_report() for c in self.clients]
        if any(r is None for r in reports):
            return None
        usage, remaining = Usage(), 0
        for r in reports:
            assert r is not None
            usage = add_usage(usage, r.usage)
            remaining = None if remaining is None or r.remaining is None else remaining + r.remaining
        return UsageReport(usage=usage, remaining=remaining)

    def upload_images(self, images: np.ndarray, *, force: bool = False) -> str:
        """Upload to every endpoint that is up; the ids are content hashes, so they agree (``ProtocolError`` if
        not). One that fails sits out its cooldown, and gets the images when a share of its needs them."""
        ids, error = set(), None
        for i in self._live() or range(len(self.clients)):
            try:
                ids.add(self.clients[i].upload_images(images, force=force))
            except Exception as exc:
                if not _endpoint_failure(exc):
                    raise
                error = exc
                self._mark_down(i, exc)
        if not ids:
            assert error is not None
            raise error
        if len(ids) != 1:
            raise ProtocolError(f"the endpoints named one image batch differently ({sorted(ids)}); they are not the "
                                "same service")
        batch = ids.pop()
        self._images[batch] = np.asarray(images)
        return batch

    def _mark_down(self, i: int, exc: BaseException) -> None:
        stats = self.stats[i]
        stats.failures += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        stats.down_until = time.monotonic() + self.cooldown_s
        logger.warning("%s failed (%s); it sits out %.0f s", stats.endpoint, stats.last_error, self.cooldown_s)

    # --- fan-out --------------------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """Each endpoint's share of the candidates, requests, seconds, failures, usage and throughput."""
        total = sum(s.candidates for s in self.stats)
        return [s.as_dict(total) for s in self.stats]

    def _live(self) -> list[int]:
        """Endpoints to use now: those up, and those whose cooldown ended and that answer ready again."""
        now, live = time.monotonic(), []
        for i, s in enumerate(self.stats):
            if s.down_until and s.down_until <= now:
                if self.clients[i].ready():
                    logger.info("%s answers again; it gets its share from now on", s.endpoint)
                    s.down_until = 0.0
                else:
                    s.down_until = now + self.cooldown_s
            if not s.down_until:
                live.append(i)
        return live

    def _plan(self, population: int, live: list[int]) -> list[_Share]:
        known = [self.stats[i].rate for i in live if self.stats[i].rate is not None]
        default = float(np.mean(known)) if known else 1.0
        counts = apportion(population, [self.stats[i].rate or default for i in live])
        shares, start = [], 0
        for i, n in zip(live, counts):
            if n:
                shares.append(_Share(start, start + n, i))
                start += n
        return shares

    def infer(self, inputs: Mapping[str, np.ndarray], *, outputs: Sequence[str] = (LOSS,),
              parameters: Mapping[str, Any] | None = None, request_id: str | None = None,
              output_parameters: Mapping[str, Mapping[str, Any]] | None = None) -> InferResult:
        """Score the population over the endpoints; outputs in candidate order (see the module docstring).
        ``parameters`` and ``output_parameters`` go with every share, as ``ClipClient.infer`` sends them."""
        varying = [k for k in inputs if k not in SHARED_INPUTS]
        population = int(np.asarray(inputs[varying[0]]).shape[0]) if varying else 1
        live = self._live()
        if not live:  # every endpoint is cooling down: try them all again rather than fail
            live = list(range(len(self.clients)))
        shares = self._plan(population, live) if varying else [_Share(0, 1, self._fastest(live))]
        parts = self._run(shares, inputs, varying, outputs, (parameters, output_parameters), request_id)
        return self._merge(parts, request_id)

    def _fastest(self, candidates: Sequence[int]) -> int:
        return max(candidates, key=lambda i: (self.stats[i].rate or 0.0, -i))

    def _send(self, share: _Share, inputs: Mapping[str, np.ndarray], varying: list[str], outputs: Sequence[str],
              parameters: _Parameters, request_id: str | None) -> tuple[InferResult, float]:
        sliced = {k: (np.asarray(v)[share.start : share.stop] if k in varying else v) for k, v in inputs.items()}
        rid = f"{request_id}@{share.start}-{share.stop}" if request_id and varying else request_id
        begun = time.perf_counter()
        result = self.clients[share.endpoint].infer(sliced, outputs=outputs, parameters=parameters[0], request_id=rid,
                                                    output_parameters=parameters[1])
        return result, time.perf_counter() - begun

    def _run(self, shares: list[_Share], inputs: Mapping[str, np.ndarray], varying: list[str], outputs: Sequence[str],
             parameters: _Parameters, request_id: str | None) -> list[tuple[_Share, InferResult]]:
        """Send every share concurrently; move a failed endpoint's share to the fastest one still up."""
        running: dict[Future[tuple[InferResult, float]], _Share] = {
            self._pool.submit(self._send, s, inputs, varying, outputs, parameters, request_id): s for s in shares}
        done: list[tuple[_Share, InferResult]] = []
        failed: set[int] = set()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                share = running.pop(future)
                try:
                    result, seconds = future.result()
                except Exception as exc:
                    share = self._recover(share, exc, inputs, failed)
                    running[self._pool.submit(self._send, share, inputs, varying, outputs, parameters, request_id)] = share
                    continue
                self.stats[share.endpoint].record(share.stop - share.start, seconds, result.usage)
                done.append((share, result))
        return sorted(done, key=lambda d: d[0].start)

    def _recover(self, share: _Share, exc: Exception, inputs: Mapping[str, np.ndarray], failed: set[int]) -> _Share:
        """The share to send next after ``exc``; raises when nothing can answer it."""
        if isinstance(exc, NotFoundError) and not share.reuploaded:  # the endpoint forgot the images (a restart)
            batch = inputs.get(IMAGE_BATCH)
            key = None if batch is None else np.asarray(batch).reshape(-1)[0]
            key = key.decode() if isinstance(key, bytes) else key
            if key in self._images:
                logger.warning("%s: %s; uploading the images there again", self.clients[share.endpoint].endpoint, exc)
                self.clients[share.endpoint].upload_images(self._images[key], force=True)
                return _Share(share.start, share.stop, share.endpoint, reuploaded=True)
        if not _endpoint_failure(exc):
            raise exc
        stats = self.stats[share.endpoint]
        if stats.down_until == 0.0:  # not already marked by a concurrent share or an upload
            self._mark_down(share.endpoint, exc)
        failed.add(share.endpoint)
        others = [i for i in range(len(self.clients)) if i not in failed and not self.stats[i].down_until]
        if not others:
            raise exc
        target = self._fastest(others)
        logger.warning("%s failed (%s); its candidates %d-%d go to %s", stats.endpoint, stats.last_error, share.start,
                       share.stop - 1, self.clients[target].endpoint)
        return _Share(share.start, share.stop, target)

    @staticmethod
    def _merge(parts: list[tuple[_Share, InferResult]], request_id: str | None) -> InferResult:
        """One result from the shares' results (already in candidate order)."""
        results = [r for _, r in parts]
        names = results[0].outputs.keys()
        outputs = {n: np.concatenate([r.outputs[n] for r in results]) for n in names}
        usage = Usage()
        for r in results:
            usage = add_usage(usage, r.usage)
        return InferResult(loss=outputs.get(LOSS), logits=outputs.get(LOGITS), usage=usage, request_id=request_id,
                           outputs=outputs, parameters={"usage": usage.model_dump(),
                                                        "shares": [[s.start, s.stop, s.endpoint] for s, _ in parts]})


def client_for(endpoint: str | Sequence[str], **kwargs: Any) -> ClipClient | FanoutClient:
    """A ``ClipClient`` for one URL, a ``FanoutClient`` over ``"URL1,URL2"`` or a list (``kwargs`` go to each
    ``ClipClient``; a fan-out's clients retry at most ``FANOUT_RETRY_S`` before their share moves on)."""
    urls = split_endpoints(endpoint)
    if len(urls) == 1:
        return ClipClient(urls[0], **kwargs)
    retry_for = kwargs.pop("retry_for", None)
    retry_for = FANOUT_RETRY_S if retry_for is None else min(retry_for, FANOUT_RETRY_S)
    return FanoutClient([ClipClient(url, retry_for=retry_for, **kwargs) for url in urls])
