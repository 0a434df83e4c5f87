"""The adapter book both backends keep (engine/adapters/book.py): the version lifecycle on plain data.

The local registry and the vLLM fleet are tested end to end elsewhere (test_adapter_versions.py,
test_vllm_backend.py, tests/vllm_real); these pin the rules they share, so both answer alike."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.adapters.book import AdapterBook, BookVersion
from engine.adapters.store import AdapterStore
from engine.vllm.lora import LoraBook, LoraVersion


@pytest.fixture
def book(tmp_path: Path) -> AdapterBook:
    return AdapterBook(AdapterStore(tmp_path / "adapters"))


def track(book: AdapterBook, domain: str, version: str, state: str = "ready") -> BookVersion:
    v = BookVersion(domain, version, state)  # type: ignore[arg-type]
    book.versions[v.key] = v
    return v


def test_a_new_serving_version_retires_the_old_one_unless_it_is_held(book: AdapterBook) -> None:
    v1, v2, v3 = (track(book, "legal", f"v{i}") for i in (1, 2, 3))
    assert book.make_serving("legal", "v1") is None  # nothing served before
    book.errors["legal"] = "v0 did not load"
    assert book.make_serving("legal", "v2") is v1
    assert (v1.state, "legal" in book.errors) == ("retired", False)
    book.hold("legal", {"v2"})
    assert book.make_serving("legal", "v3") is None  # v2 is held: it stays ready
    assert (v2.state, v3.state) == ("ready", "ready")


def test_letting_go_retires_only_what_neither_serves_nor_stays_held(book: AdapterBook) -> None:
    track(book, "legal", "v1")
    v2, v3 = track(book, "legal", "v2"), track(book, "legal", "v3")
    book.make_serving("legal", "v1")
    before = book.hold("legal", {"v1", "v2", "v3"})
    assert before == frozenset()
    before = book.hold("legal", {"v3"})
    assert [v.version for v in book.let_go("legal", before)] == ["v2"]  # v1 serves, v3 is still held
    assert (v2.state, v3.state, book.held["legal"]) == ("retired", "ready", frozenset({"v3"}))


def test_a_request_keeps_its_version_until_it_ends(book: AdapterBook) -> None:
    v1, v2 = track(book, "legal", "v1"), track(book, "legal", "v2")
    book.make_serving("legal", "v1")
    book.use(v1)
    book.make_serving("legal", "v2")
    assert (v1.state, v1.in_flight) == ("retired", 1)
    assert book.release(v1) is True  # its last request: free it now
    book.use(v2)
    assert book.release(v2) is False  # it serves


def test_the_catalog_and_the_residents_report_states_errors_and_failures(book: AdapterBook, tmp_path: Path) -> None:
    store = book.store
    for version in ("v1", "v2"):
        (store.root / "legal" / version).mkdir(parents=True)
    v1 = track(book, "legal", "v1")
    v1.bytes, v1.file_bytes = 1024, 512
    book.make_serving("legal", "v1")
    book.failed["legal__v2"] = "adapter legal/v2: adapter_model.safetensors is missing"
    (info,) = book.catalog()
    assert (info.name, info.current) == ("legal", "v1")
    assert {v.version: v.state for v in info.versions} == {"v1": "ready", "v2": "failed"}
    (resident,) = book.resident()
    assert (resident.name, resident.version, resident.bytes, resident.file_bytes) == ("legal", "v1", 1024, 512)
    assert "available: legal" in book.not_found("medical")


def test_the_vllm_book_unloads_a_pinned_version_after_its_last_request(tmp_path: Path) -> None:
    """Replicas hold only what serves, is held or answers now; memory (the local book) is a cache."""
    book = LoraBook(AdapterStore(tmp_path / "adapters"))
    serving = book.track(LoraVersion("legal", "v2", path="/a/legal/v2", rank=8))
    book.serve(serving)
    pinned = book.track(LoraVersion("legal", "v1", path="/a/legal/v1", rank=8))
    pinned.state = "ready"
    book.use(pinned)
    assert {v.key for v in book.wanted()} == {"legal__v1", "legal__v2"}
    assert book.release(pinned) is True
    assert book.keep() == {"legal__v2"}
    assert book.lease("legal") is serving and serving.in_flight == 1
