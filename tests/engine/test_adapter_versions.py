"""Versions beside the serving one, on the real Engine and the real default model (SmolLM2-135M,
fp32 without the prefix cache, so a greedy answer is the same to the character each time it is
computed alone): a request pinned to a version (`GenerationParams.adapter_version`), versions held
resident for an A/B (`Engine.hold`), and the audit stamp every answer carries.

legal/v2 is the shipped legal/v1 with lora_B tripled: the same shapes, other answers.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from engine import Engine, GenerationParams, Message, Mode
from engine.adapters.store import AdapterStore
from engine.config import load_settings
from engine.errors import AdapterInvalid, AdapterNotFound, ConfigError, EngineError
from engine.types import EffectiveSampling, UserContext
from tests.engine.test_engine_integration import QUESTION, answer, scaled_copy

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("legal", "medical", "finance")
LONG = GenerationParams(max_new_tokens=24, temperature=0, ignore_eos=True)
LEGAL = Mode("legal", "assistant")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("versions")
    for domain in DOMAINS:
        (root / "adapters" / domain).mkdir(parents=True)
        shutil.copytree(ROOT / "adapters" / domain / "v1", root / "adapters" / domain / "v1")
        (root / "adapters" / domain / "current").write_text("v1\n")
    store = AdapterStore(root / "adapters")
    for domain in ("legal", "medical"):  # v2: trained, kept back (what an A/B tests)
        assert scaled_copy(store, domain, root / "adapters" / domain / "v1", 3.0, {"status": "candidate"}) == "v2"
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(workdir: Path):
    """Room for two versions: a held one and one serving one, so every other load evicts."""
    settings = load_settings(
        _env_file=None, adapters_dir=workdir / "adapters", templates_dir=workdir / "templates",
        model_cache_dir=ROOT / "models", template_poll_s=0, quantization="none", compute_dtype="float32",
        context_tokens=1024, prefix_cache_tokens=0, max_resident_adapters=2,
    )
    async with Engine(settings) as eng:
        yield eng


def resident(engine: Engine) -> dict[tuple[str, str], str]:
    engine.registry.wait_idle()
    return {(a.name, a.version): a.state for a in engine.status().adapters}


async def test_a_pinned_version_answers_instead_of_the_serving_one(engine: Engine) -> None:
    serving, serving_res = await answer(engine, LEGAL, params=LONG)
    pinned, pinned_res = await answer(engine, LEGAL, params=GenerationParams(
        max_new_tokens=24, temperature=0, ignore_eos=True, adapter_version="v2"))
    assert serving and pinned and pinned != serving
    assert (pinned_res.adapter_version, pinned_res.stamp.adapter_version) == ("v2", "v2")
    assert (serving_res.adapter_version, serving_res.stamp.adapter_version) == ("v1", "v1")
    again, again_res = await answer(engine, LEGAL, params=LONG)  # the domain still serves v1
    assert (again, again_res.adapter_version) == (serving, "v1")
    assert engine.modes().adapter("legal").current == "v1"


async def test_a_held_version_outlives_eviction_and_reload_and_goes_when_let_go(engine: Engine) -> None:
    held = await engine.hold("legal", ("v2",))
    assert [(a.name, a.version, a.state) for a in held] == [("legal", "v2", "ready")]
    assert held[0].bytes > 0 and held[0].file_bytes > 0
    info = engine.modes().adapter("legal")
    v2 = next(v for v in info.versions if v.version == "v2")
    assert (v2.state, v2.candidate, info.current) == ("ready", True, "v1")
    for mode in (Mode("medical", "doctor"), Mode("finance", "financial_analyst"), LEGAL):
        _, res = await answer(engine, mode, params=GenerationParams(max_new_tokens=4, temperature=0))
        assert res.adapter_version == "v1"
        now = resident(engine)
        assert now[("legal", "v2")] == "ready"
        assert sum(state == "ready" for state in now.values()) <= 2  # MAX_RESIDENT_ADAPTERS
    assert ("medical", "v1") not in now  # the pressure was real: serving versions were evicted
    report = await engine.reload()
    assert not report.failed
    assert resident(engine)[("legal", "v2")] == "ready"
    assert await engine.hold("legal", ("v2",)) == held  # the same set again: nothing changes
    assert await engine.hold("legal", ()) == ()
    assert ("legal", "v2") not in resident(engine)


async def test_a_pinned_request_keeps_its_version_while_it_runs_when_the_hold_ends(engine: Engine) -> None:
    pin = GenerationParams(max_new_tokens=24, temperature=0, ignore_eos=True, adapter_version="v2")
    expected, _ = await answer(engine, LEGAL, params=pin)
    await engine.hold("legal", ("v2",))
    stream = engine.generate([Message("user", QUESTION)], LEGAL, pin)
    pieces = [await stream.__anext__()]
    await engine.hold("legal", ())
    during = next(a for a in engine.status().adapters if (a.name, a.version) == ("legal", "v2"))
    assert (during.state, during.in_flight) == ("retired", 1)
    pieces += [p async for p in stream]
    assert "".join(pieces) == expected and stream.result.adapter_version == "v2"
    assert ("legal", "v2") not in resident(engine)  # freed once its last request finished


async def test_a_broken_or_missing_candidate_is_refused_and_nothing_else_changes(
    engine: Engine, workdir: Path
) -> None:
    store = AdapterStore(workdir / "adapters")
    bad = scaled_copy(store, "legal", workdir / "adapters/legal/v1", 2.0, {"status": "candidate"})
    store.version("legal", bad).weights.write_bytes(b"\x00garbage" * 100)
    await engine.hold("legal", ("v2",))
    try:
        with pytest.raises(AdapterInvalid, match=bad):
            await engine.hold("legal", (bad,))
        with pytest.raises(AdapterNotFound, match="v99"):
            await engine.hold("legal", ("v99",))
        assert resident(engine)[("legal", "v2")] == "ready"  # the previous set is still held
        assert ("legal", bad) not in resident(engine)
        info = engine.modes().adapter("legal")
        assert (info.current, info.error) == ("v1", None)  # the domain is not marked broken
        assert next(v for v in info.versions if v.version == bad).state == "failed"
        _, res = await answer(engine, LEGAL)
        assert res.adapter_version == "v1"
        with pytest.raises(AdapterInvalid, match=bad):
            await answer(engine, LEGAL, params=GenerationParams(max_new_tokens=4, adapter_version=bad))
        with pytest.raises(AdapterNotFound, match="v99"):
            await answer(engine, LEGAL, params=GenerationParams(max_new_tokens=4, adapter_version="v99"))
        with pytest.raises(EngineError, match="needs an adapter"):
            await answer(engine, Mode(None, "assistant"), params=GenerationParams(adapter_version="v2"))
        # MAX_RESIDENT_ADAPTERS=2: one held version beside the serving ones is all it has room for
        with pytest.raises(ConfigError, match="MAX_RESIDENT_ADAPTERS=2"):
            await engine.hold("medical", ("v2",))
        assert ("medical", "v2") not in resident(engine)
    finally:
        await engine.hold("legal", ())


async def test_the_stamp_says_what_produced_the_answer(engine: Engine, workdir: Path) -> None:
    params = GenerationParams(max_new_tokens=6, temperature=0.7, top_k=5, seed=11)
    stream = engine.generate([Message("user", QUESTION)], Mode("legal", "lawyer"), params,
                             user=UserContext(language="de"))  # no German lawyer: the English one serves
    text = "".join([p async for p in stream])
    stamp = stream.result.stamp
    assert text and stamp is not None
    s = engine.settings
    assert stamp.sampling == EffectiveSampling(max_new_tokens=6, temperature=0.7, top_p=s.top_p, top_k=5,
                                               repetition_penalty=s.repetition_penalty, seed=11)
    meta = AdapterStore(workdir / "adapters").version("legal", "v1").meta
    assert stamp.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" == meta["base_model"]
    assert stamp.base_fingerprint == meta["base_fingerprint"]  # the weights the adapter was trained on
    assert (stamp.quantization, stamp.backend, stamp.replica) == ("none", "local", None)
    assert (stamp.adapter, stamp.adapter_version, stamp.template) == ("legal", "v1", "lawyer")
    source = (workdir / "templates" / "lawyer.en.j2").read_bytes()
    assert (stamp.template_language, stamp.template_hash) == ("en", hashlib.sha256(source).hexdigest())

    stream = engine.generate([Message("user", "Привет")], Mode(None, "doctor"), GenerationParams(max_new_tokens=4),
                             user=UserContext(language="ru"))
    _ = [p async for p in stream]
    stamp = stream.result.stamp
    ru = (workdir / "templates" / "doctor.ru.j2").read_bytes()
    assert (stamp.adapter, stamp.adapter_version, stamp.template) == (None, None, "doctor")
    assert (stamp.template_language, stamp.template_hash) == ("ru", hashlib.sha256(ru).hexdigest())
    assert stamp.sampling.temperature == s.temperature and stamp.sampling.seed is None


async def test_promoting_a_held_candidate_serves_what_the_pin_answered(engine: Engine, workdir: Path) -> None:
    pin = GenerationParams(max_new_tokens=24, temperature=0, ignore_eos=True, adapter_version="v2")
    await engine.hold("legal", ("v2",))
    pinned, _ = await answer(engine, LEGAL, params=pin)
    store = AdapterStore(workdir / "adapters")
    store.set_current("legal", "v2")
    report = await engine.reload("legal")
    assert report.loaded == {"legal": "v2"}
    served, res = await answer(engine, LEGAL, params=LONG)
    assert (served, res.adapter_version) == (pinned, "v2")
    assert await engine.hold("legal", ()) == ()  # serving now: letting go of the hold keeps it
    now = resident(engine)
    assert now[("legal", "v2")] == "ready" and ("legal", "v1") not in now
