"""The real Engine on the real default model (SmolLM2-135M, nf4, the default fast serving
path): adapters per request, hot reload under load, refusal of broken adapters and templates.
The fast path's token-for-token equality with the reference path is in test_fast_path.py."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from engine import Engine, GenerationParams, Message, Mode
from engine.adapters.store import AdapterStore
from engine.config import load_settings
from engine.errors import AdapterNotFound, TemplateNotFound

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What should I check before signing a rental contract?"
GREEDY = GenerationParams(max_new_tokens=24, temperature=0)


def scaled_copy(store: AdapterStore, domain: str, src: Path, factor: float, meta_changes: dict | None = None) -> str:
    """A new version of `domain` with lora_B scaled: same shapes, different answers."""
    from safetensors.torch import load_file, save_file

    with store.staging(domain) as staged:
        for f in ("adapter_config.json",):
            shutil.copy(src / f, staged / f)
        tensors = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: (v * factor if ".lora_B." in k else v) for k, v in tensors.items()},
                  str(staged / "adapter_model.safetensors"))
        meta = json.loads((src / "meta.json").read_text())
        meta.update(meta_changes or {})
        return store.commit(domain, staged, meta).version


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    for domain in ("legal", "medical"):
        (root / "adapters" / domain).mkdir(parents=True)
        shutil.copytree(ROOT / "adapters" / domain / "v1", root / "adapters" / domain / "v1")
        (root / "adapters" / domain / "current").write_text("v1\n")
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(workdir: Path):
    settings = load_settings(
        adapters_dir=workdir / "adapters", templates_dir=workdir / "templates",
        model_cache_dir=ROOT / "models", template_poll_s=0, quantization="nf4", context_tokens=1024,
    )
    eng = Engine(settings)
    await eng.start()
    yield eng
    await eng.close()


async def answer(engine: Engine, mode: Mode, question: str = QUESTION, params: GenerationParams = GREEDY):
    stream = engine.generate([Message("user", question)], mode, params)
    text = "".join([piece async for piece in stream])
    assert text == stream.result.text
    return text, stream.result


async def test_adapter_changes_the_answer(engine: Engine) -> None:
    base, base_res = await answer(engine, Mode(None, "assistant"))
    legal, legal_res = await answer(engine, Mode("legal", "assistant"))
    assert base and legal and base != legal
    assert (base_res.adapter_version, legal_res.adapter_version) == (None, "v1")
    assert legal_res.completion_tokens > 0 and legal_res.finish_reason in ("stop", "length")


MIXED = [
    (Mode(None, "assistant"), QUESTION),
    (Mode("legal", "lawyer"), QUESTION),
    (Mode("medical", "doctor"), "How much water should I drink a day?"),
    (Mode("legal", "assistant"), "Can my landlord keep my deposit?"),
]


async def solo_and_together(engine: Engine) -> tuple[list[str], list[str]]:
    solo = [(await answer(engine, m, q))[0] for m, q in MIXED]
    together = await asyncio.gather(*(answer(engine, m, q) for m, q in MIXED))
    return solo, [t for t, _ in together]


async def test_concurrent_mixed_adapters_match_solo_runs_exactly_in_fp32(workdir: Path) -> None:
    """No cross-talk between rows: batched with other adapters == alone, to the character.
    Without the prefix cache, so the batched rows compute their prompts again beside each other."""
    settings = load_settings(
        adapters_dir=workdir / "adapters", templates_dir=workdir / "templates",
        model_cache_dir=ROOT / "models", quantization="none", compute_dtype="float32", context_tokens=1024,
        prefix_cache_tokens=0,
    )
    async with Engine(settings) as fp32:
        solo, together = await solo_and_together(fp32)
    assert together == solo
    assert len(set(solo)) == len(solo)


async def test_concurrent_mixed_adapters_in_nf4_keep_their_own_adapter(engine: Engine) -> None:
    """In nf4 a lone row decodes through bitsandbytes' gemv kernel and a batch through
    dequantize+matmul; their rounding differs, so greedy text may drift late. The opening
    tokens must still be each row's own."""
    solo, together = await solo_and_together(engine)
    for alone, batched in zip(solo, together):
        words = alone.split()[:5]
        assert batched.split()[:5] == words


async def test_reload_during_a_stream_leaves_it_intact(engine: Engine, workdir: Path) -> None:
    store = AdapterStore(workdir / "adapters")
    long = GenerationParams(max_new_tokens=40, temperature=0)
    expected_v1, _ = await answer(engine, Mode("legal", "assistant"), params=long)

    stream = engine.generate([Message("user", QUESTION)], Mode("legal", "assistant"), long)
    pieces = [await stream.__anext__()]  # the stream is running on v1
    version = scaled_copy(store, "legal", workdir / "adapters/legal/v1", 3.0)
    store.set_current("legal", version)
    report = await engine.reload("legal")
    assert report.loaded == {"legal": version}
    pieces += [p async for p in stream]
    assert "".join(pieces) == expected_v1
    assert stream.result.adapter_version == "v1"

    new_text, new_res = await answer(engine, Mode("legal", "assistant"), params=long)
    assert new_res.adapter_version == version and new_text != expected_v1
    engine.registry.wait_idle()
    resident = {(a.name, a.version) for a in engine.status().adapters}
    assert ("legal", "v1") not in resident and ("legal", version) in resident


@pytest.mark.parametrize("breakage", ["corrupt-weights", "other-base-model", "wrong-rank"])
async def test_broken_adapter_is_refused_and_the_old_version_keeps_serving(
    engine: Engine, workdir: Path, breakage: str
) -> None:
    store = AdapterStore(workdir / "adapters")
    serving = engine.registry.serving()["medical"]
    src = workdir / "adapters/medical" / serving
    if breakage == "other-base-model":
        # other weights (the fingerprint decides; the name is only a label)
        bad = scaled_copy(store, "medical", src, 2.0, {"base_model": "meta-llama/Llama-3.1-8B",
                                                       "base_fingerprint": "w1:" + "0" * 32})
    else:
        bad = scaled_copy(store, "medical", src, 2.0)
        weights = store.version("medical", bad).weights
        if breakage == "corrupt-weights":
            weights.write_bytes(b"\x00garbage" * 100)
        else:
            from safetensors.torch import load_file, save_file

            t = load_file(str(weights))
            save_file({k: v[:4] if ".lora_A." in k else v for k, v in t.items()}, str(weights))
    store.set_current("medical", bad)
    report = await engine.reload("medical")
    assert "medical" in report.failed and bad in report.failed["medical"]
    assert engine.modes().adapter("medical").error
    text, res = await answer(engine, Mode("medical", "doctor"), "I have a headache, what can I do?")
    assert res.adapter_version == serving and text
    store.set_current("medical", serving)


async def test_broken_template_keeps_the_last_good_version(engine: Engine, workdir: Path) -> None:
    good = engine.templates.render_system("lawyer")
    path = workdir / "templates/lawyer.en.j2"
    original = path.read_text()
    try:
        path.write_text(original + "\n{% if %}broken\n")
        report = await engine.reload()
        assert any("lawyer.en.j2" in name and "line" in msg for name, msg in report.templates.items())
        assert engine.templates.render_system("lawyer") == good
        text, _ = await answer(engine, Mode("legal", "lawyer"))
        assert text
        assert engine.modes().role("lawyer").error
    finally:
        path.write_text(original)
        await engine.reload()
    assert engine.modes().role("lawyer").error is None


async def test_cancel_frees_the_row_and_unknown_modes_are_refused(engine: Engine) -> None:
    stream = engine.generate([Message("user", QUESTION)], Mode("legal", "lawyer"), GenerationParams(max_new_tokens=300))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(200):
        if engine.status().active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.status().active_requests == 0
    assert stream.result.finish_reason == "cancelled"
    with pytest.raises(AdapterNotFound):
        await answer(engine, Mode("astrology", "assistant"))
    with pytest.raises(TemplateNotFound):
        await answer(engine, Mode(None, "pirate"))
