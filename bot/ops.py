"""The ops side port: `GET /healthz` and `GET /metrics` for Docker, load balancers and Prometheus.

A separate small aiohttp server, not a route on the webhook server, so probes and scrapes
never compete with Telegram traffic and the port can stay private to the host.

`/healthz` runs every named check concurrently, each under a timeout: a check that hangs
(a wedged database, a dead model thread) counts as failed instead of hanging the probe.
All pass: 200 and `{"status": "ok", "checks": {...}}`; otherwise 503 with the same body plus
`"failed": [names]`. `/metrics` is the Prometheus text format (or OpenMetrics, when the
scraper asks for it) of all the registries handed in: the engine's and the bot's.

Run as `python -m bot.ops probe` it is the container's HEALTHCHECK: it asks /healthz on
127.0.0.1:$OPS_PORT with the standard library and exits 0 only on 200.

Imports aiohttp and prometheus_client only (no torch, no aiogram), so the probe starts fast.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]

#: How long one health check may take before it counts as failed.
DEFAULT_CHECK_TIMEOUT_S = 5.0


class _Registries(Collector):
    """Several registries seen as one collector, so one encoder writes one valid exposition."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self._registries = tuple(registries)

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


class OpsServer:
    """`/healthz` and `/metrics` on their own port. `port=0` binds a free port (see `.port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: Mapping[str, Check],
        registries: Iterable[CollectorRegistry],
        *,
        check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
        details: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """`details()`, when given, adds its keys to every /healthz body (e.g. each replica's state)."""
        if check_timeout_s <= 0:
            raise ValueError(f"check_timeout_s must be positive, got {check_timeout_s!r}")
        self.host = host
        self._requested_port = port
        self.checks = dict(checks)
        self.registries = list(registries)
        self.check_timeout_s = check_timeout_s
        self.details = details
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._bound_port: int | None = None
        self._last_failed: frozenset[str] = frozenset()

    @property
    def port(self) -> int:
        """The port actually listened on (differs from the requested one when that was 0)."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Bind and serve; raises OSError naming host and port when the port is taken."""
        if self._runner is not None:
            return
        # access_log=None: a probe every few seconds would drown the event log.
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"ops server cannot listen on {self.host}:{self._requested_port} (OPS_HOST/OPS_PORT): {exc}"
            ) from exc
        self._runner, self._site = runner, site
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or ()
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._requested_port
        # the address bound, not `url` (which names 127.0.0.1 for a wildcard host: where to ask, not where it listens)
        host = f"[{self.host}]" if ":" in self.host else (self.host or "0.0.0.0")
        everywhere = "all interfaces; " if self.host in ("0.0.0.0", "::", "") else ""
        log.info("ops server listening on http://%s:%d (%s/healthz, /metrics)", host, self.port, everywhere)

    async def stop(self) -> None:
        """Stop listening; safe to call twice or before start()."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
            log.info("ops server stopped")

    async def __aenter__(self) -> "OpsServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- health ---------------------------------------------------------------------------

    async def run_checks(self) -> dict[str, dict[str, Any]]:
        """Every check, concurrently: name -> {"ok": bool, "seconds": float, "error"?: str}."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._run_one(n) for n in names))
        return dict(zip(names, results))

    async def _run_one(self, name: str) -> dict[str, Any]:
        started = time.monotonic()
        error: str | None = None
        try:
            ok = bool(await asyncio.wait_for(self.checks[name](), self.check_timeout_s))
        except asyncio.TimeoutError:
            ok, error = False, f"timed out after {self.check_timeout_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a raising check is a failing check, not a crashed probe
            ok, error = False, f"{type(exc).__name__}: {exc}"
        result: dict[str, Any] = {"ok": ok, "seconds": round(time.monotonic() - started, 4)}
        if error is not None:
            result["error"] = error
        return result

    async def _healthz(self, request: web.Request) -> web.Response:
        results = await self.run_checks()
        failed = sorted(name for name, r in results.items() if not r["ok"])
        self._log_transition(frozenset(failed), results)
        body: dict[str, Any] = {"status": "fail" if failed else "ok", "checks": results}
        if failed:
            body["failed"] = failed
        if self.details is not None:
            try:
                body.update(self.details())
            except Exception:  # details are a nicety; the checks decide health
                log.exception("health details failed")
        return web.json_response(body, status=503 if failed else 200)

    def _log_transition(self, failed: frozenset[str], results: Mapping[str, Mapping[str, Any]]) -> None:
        """Log when the set of failing checks changes, not on every probe."""
        if failed == self._last_failed:
            return
        newly = sorted(failed - self._last_failed)
        recovered = sorted(self._last_failed - failed)
        self._last_failed = failed
        for name in newly:
            log.warning("health check %r failing: %s", name, results[name].get("error", "returned false"))
        if recovered:
            log.info("health checks recovered: %s", ", ".join(recovered))

    # ---- metrics --------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        payload = encoder(_Registries(self.registries))
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response


# ---- the container's HEALTHCHECK ----------------------------------------------------------


def probe(url: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """GET url; (True, body) on 200, (False, reason) otherwise. Standard library only."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (our own port)
            return resp.status == 200, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bot.ops", description="Probe the ops port (HEALTHCHECK).")
    parser.add_argument("command", choices=["probe"])
    parser.add_argument("--url", help="default: http://127.0.0.1:$OPS_PORT/healthz")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        port = os.environ.get("OPS_PORT", "").strip()
        if not port.isdigit():
            sys.stderr.write(f"OPS_PORT={port!r}: set it to the ops port (e.g. 9090) or pass --url\n")
            return 2
        url = f"http://127.0.0.1:{port}/healthz"
    ok, detail = probe(url, args.timeout)
    (sys.stdout if ok else sys.stderr).write(detail.strip() + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
