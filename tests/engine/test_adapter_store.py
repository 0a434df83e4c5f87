"""The adapters folder: atomic versions, numbering, the `current` pointer, history, names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.adapters.store import CONFIG_FILE, META_FILE, WEIGHTS_FILE, AdapterStore, version_number
from engine.errors import AdapterInvalid, AdapterNotFound


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def write_files(folder: Path, weights: bool = True, config: bool = True) -> None:
    if config:
        (folder / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 4}', encoding="utf-8")
    if weights:
        (folder / WEIGHTS_FILE).write_bytes(b"weights")


def new_version(store: AdapterStore, domain: str = "legal", **meta: object) -> str:
    with store.staging(domain) as staged:
        write_files(staged)
    return store.commit(domain, staged, dict(meta)).version


def make_dir(store: AdapterStore, domain: str, version: str, **meta: object) -> Path:
    """A version folder made by hand (as an operator copying files would)."""
    p = store.root / domain / version
    p.mkdir(parents=True)
    write_files(p)
    if meta:
        (p / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return p


def leftovers(store: AdapterStore, domain: str) -> list[str]:
    d = store.root / domain
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or ".tmp" in p.name) if d.is_dir() else []


# ---- writing versions ------------------------------------------------------------------

def test_commit_creates_numbered_versions_with_meta(store: AdapterStore) -> None:
    assert store.next_version("legal") == "v1"
    assert new_version(store, base_model="m", metrics={"eval_loss": 1.5}) == "v1"
    assert new_version(store, base_model="m") == "v2"
    assert store.next_version("legal") == "v3"
    v1 = store.version("legal", "v1")
    assert v1.meta["name"] == "legal" and v1.meta["version"] == "v1"
    assert v1.meta["base_model"] == "m" and v1.meta["metrics"] == {"eval_loss": 1.5}
    assert v1.meta["created"].endswith("+00:00")
    assert sorted(p.name for p in v1.path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, META_FILE])
    assert v1.weights == v1.path / WEIGHTS_FILE
    assert leftovers(store, "legal") == []


def test_meta_cannot_claim_another_version(store: AdapterStore) -> None:
    assert new_version(store, version="v99", name="legal") == "v1"
    assert store.version("legal", "v1").meta["version"] == "v1"


@pytest.mark.parametrize(
    "existing, expected",
    [([], "v1"), (["v1"], "v2"), (["v1", "v3"], "v4"), (["v2", "v10", "v9"], "v11"), (["v7"], "v8")],
)
def test_next_version_after_existing(store: AdapterStore, existing: list[str], expected: str) -> None:
    for v in existing:
        make_dir(store, "legal", v)
    (store.root / "legal" / "v1-old").mkdir(parents=True)  # not a version name: ignored
    (store.root / "legal" / "data").mkdir(exist_ok=True)
    assert store.next_version("legal") == expected
    assert [v.version for v in store.versions("legal")] == sorted(existing, key=version_number)
    assert new_version(store) == expected


def test_interleaved_stagings_get_distinct_versions(store: AdapterStore) -> None:
    with store.staging("legal") as a:
        write_files(a)
    with store.staging("legal") as b:
        write_files(b)
    assert a != b
    assert store.commit("legal", b, {"tag": "b"}).version == "v1"
    assert store.commit("legal", a, {"tag": "a"}).version == "v2"
    assert [store.version("legal", v).meta["tag"] for v in ("v1", "v2")] == ["b", "a"]


def test_commit_skips_a_number_taken_meanwhile(store: AdapterStore) -> None:
    """Another writer renamed its folder to the next number first: take the one after."""
    with store.staging("legal") as staged:
        write_files(staged)
    taken = store.root / "legal" / "v1"
    taken.mkdir()
    (taken / "marker").write_text("other writer", encoding="utf-8")
    assert store.commit("legal", staged, {}).version == "v2"
    assert (taken / "marker").read_text(encoding="utf-8") == "other writer"


def test_failing_block_leaves_nothing(store: AdapterStore) -> None:
    with pytest.raises(RuntimeError, match="trainer died"):
        with store.staging("legal") as staged:
            write_files(staged)
            raise RuntimeError("trainer died")
    assert not staged.exists()
    assert store.versions("legal") == []
    assert leftovers(store, "legal") == []
    assert store.next_version("legal") == "v1"


def test_interrupt_also_cleans_staging(store: AdapterStore) -> None:
    with pytest.raises(KeyboardInterrupt):
        with store.staging("legal") as staged:
            raise KeyboardInterrupt
    assert not staged.exists()


@pytest.mark.parametrize("weights, config, missing", [(False, True, WEIGHTS_FILE), (True, False, CONFIG_FILE)])
def test_commit_refuses_incomplete_staging(store: AdapterStore, weights: bool, config: bool, missing: str) -> None:
    with store.staging("legal") as staged:
        write_files(staged, weights=weights, config=config)
    with pytest.raises(AdapterInvalid, match=missing):
        store.commit("legal", staged, {})
    assert store.versions("legal") == []
    assert leftovers(store, "legal") == []


def test_clean_staging(store: AdapterStore) -> None:
    new_version(store)
    for n in range(2):
        d = store.root / "legal" / f".staging-killed{n}"
        d.mkdir()
        write_files(d)
    assert store.clean_staging("legal") == 2
    assert leftovers(store, "legal") == []
    assert [v.version for v in store.versions("legal")] == ["v1"]
    assert store.clean_staging("legal") == 0
    assert store.clean_staging("medical") == 0  # no folder at all


# ---- the current pointer ---------------------------------------------------------------

def test_set_current_points_and_leaves_no_temp_files(store: AdapterStore) -> None:
    for _ in range(3):
        new_version(store)
    store.set_current("legal", "v2")
    assert (store.root / "legal" / "current").read_text(encoding="utf-8") == "v2\n"
    assert store.current("legal") == "v2"
    store.set_current("legal", "v3")
    assert store.current("legal") == "v3"
    assert leftovers(store, "legal") == []


@pytest.mark.parametrize("bad", ["v9", "2", "latest", "v1/../v1", "../legal/v1", "current", "v"])
def test_set_current_validates_the_version(store: AdapterStore, bad: str) -> None:
    new_version(store)
    store.set_current("legal", "v1")
    with pytest.raises(AdapterNotFound, match="legal"):
        store.set_current("legal", bad)
    assert store.current("legal") == "v1"
    assert store.history("legal") == ["v1"]


@pytest.mark.parametrize(
    "versions, pointer, expected",
    [
        ([], None, None),
        ([("v1", None), ("v2", None)], None, "v2"),  # no meta status: counts as promoted
        ([("v1", "promoted"), ("v2", "rejected")], None, "v1"),
        ([("v1", "promoted"), ("v2", "promoted"), ("v3", "candidate")], None, "v2"),
        ([("v1", "rejected")], None, None),
        ([("v1", None), ("v2", None)], "v1\n", "v1"),
        ([("v1", None), ("v2", None)], "  v1  ", "v1"),
        ([("v1", None), ("v2", None)], "garbage", "v2"),  # unreadable pointer: fall back
        ([("v1", None), ("v2", None)], "", "v2"),
    ],
)
def test_current_fallback(
    store: AdapterStore, versions: list[tuple[str, str | None]], pointer: str | None, expected: str | None
) -> None:
    (store.root / "legal").mkdir(parents=True)
    for v, status in versions:
        make_dir(store, "legal", v, **({"status": status} if status else {"base_model": "m"}))
    if pointer is not None:
        (store.root / "legal" / "current").write_text(pointer, encoding="utf-8")
    assert store.current("legal") == expected


def test_rollback_walks_the_served_history(store: AdapterStore) -> None:
    for _ in range(3):
        new_version(store)
    for v in ("v1", "v2", "v3"):
        store.set_current("legal", v)
    assert store.rollback("legal") == "v2"
    assert store.current("legal") == "v2"
    assert store.rollback("legal") == "v1"
    with pytest.raises(AdapterNotFound, match="earlier"):
        store.rollback("legal")
    assert store.current("legal") == "v1"


def test_rollback_without_history_uses_older_promoted(store: AdapterStore) -> None:
    make_dir(store, "legal", "v1", status="promoted")
    make_dir(store, "legal", "v2", status="rejected")
    make_dir(store, "legal", "v3", status="promoted")
    (store.root / "legal" / "current").write_text("v3\n", encoding="utf-8")
    assert store.rollback("legal") == "v1"


def test_update_meta(store: AdapterStore) -> None:
    new_version(store, base_model="m")
    meta = store.update_meta("legal", "v1", status="rejected")
    assert meta["status"] == "rejected" and meta["base_model"] == "m"
    assert store.version("legal", "v1").meta == meta
    assert leftovers(store, "legal") == []


def test_broken_meta_is_reported_not_raised(store: AdapterStore) -> None:
    p = make_dir(store, "legal", "v1")
    (p / META_FILE).write_text("{not json", encoding="utf-8")
    assert "not valid JSON" in store.version("legal", "v1").meta["_error"]
    (p / META_FILE).write_text("[1, 2]", encoding="utf-8")
    assert "not a JSON object" in store.version("legal", "v1").meta["_error"]


# ---- names -------------------------------------------------------------------------------

BAD_NAMES = [
    "Legal", "../etc", "", "a/b", ".staging-x", "-legal", "_x", "x" * 65, "legal ", "legal\n", "lé", "v1/../..",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_domain_names_refused(store: AdapterStore, name: str) -> None:
    calls = [
        lambda: store.domain_dir(name),
        lambda: store.versions(name),
        lambda: store.current(name),
        lambda: store.next_version(name),
        lambda: store.clean_staging(name),
        lambda: store.set_current(name, "v1"),
    ]
    for call in calls:
        with pytest.raises(AdapterNotFound, match="not an adapter name"):
            call()
    with pytest.raises(AdapterNotFound):
        with store.staging(name):
            pass
    assert not store.root.exists()  # nothing was created anywhere


@pytest.mark.parametrize("name", ["legal", "medical", "finance", "tax-2025", "a", "x" * 64, "0day"])
def test_valid_domain_names(store: AdapterStore, name: str) -> None:
    assert new_version(store, name) == "v1"
    assert name in store.domains()


def test_domains_lists_only_real_domains(store: AdapterStore) -> None:
    new_version(store, "legal")
    (store.root / "medical" / "data").mkdir(parents=True)  # data only: can be trained
    (store.root / "empty").mkdir()
    (store.root / "Notes").mkdir()
    (store.root / "README.md").write_text("hi", encoding="utf-8")
    assert store.domains() == ["legal", "medical"]
    assert AdapterStore(store.root / "nowhere").domains() == []


@pytest.mark.parametrize("version", ["v1", "v01x", "1", "current", "../legal/v1"])
def test_version_lookup_errors_name_domain(store: AdapterStore, version: str) -> None:
    (store.root / "legal").mkdir(parents=True)
    with pytest.raises(AdapterNotFound) as err:
        store.version("legal", version)
    assert "legal" in str(err.value) and repr(version) in str(err.value)


@pytest.mark.parametrize("bad", ["1", "v", "vx", "V1", "v1.0", "v-1", "v1\n"])
def test_version_number_rejects_non_versions(bad: str) -> None:
    with pytest.raises(ValueError, match="v1, v2"):
        version_number(bad)


def test_version_number() -> None:
    assert [version_number(v) for v in ("v1", "v9", "v10", "v123")] == [1, 9, 10, 123]


def test_catalog_marks_versions_kept_back_by_training_as_candidates(store: AdapterStore) -> None:
    """The one catalog both backends list (/adapters, /ab): a version whose meta says "candidate"
    and that does not serve is what an A/B can test; the serving one never is, whatever its meta."""
    from engine.adapters.store import catalog, version_name

    make_dir(store, "legal", "v1", status="promoted")
    make_dir(store, "legal", "v2", status="candidate", metrics={"eval_loss": 1.5, "bad": float("nan")})
    make_dir(store, "legal", "v3", status="candidate")
    make_dir(store, "medical", "v1")
    got = {a.name: a for a in catalog(store, {"legal": "v3", "finance": "v1"}, {version_name("legal", "v3"): "ready"},
                                      {"finance": "no folder"})}
    assert sorted(got) == ["finance", "legal", "medical"]
    legal = {v.version: v for v in got["legal"].versions}
    assert [legal[v].candidate for v in ("v1", "v2", "v3")] == [False, True, False]
    assert legal["v3"].is_current and legal["v3"].state == "ready" and legal["v2"].state is None
    assert legal["v2"].metrics == {"eval_loss": 1.5}
    assert got["finance"].versions == () and got["finance"].error == "no folder"
    assert not any(v.candidate for v in got["medical"].versions)
