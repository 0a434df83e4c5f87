"""What the engine does at start and while running when its folders or templates are wrong,
and that nothing slow runs on the caller's event loop.

The folder checks run before the model loads, so those tests need no model; the others start
the real default model once, loaded from its converted folder (MODEL=<folder>), which must
accept the shipped adapters trained under the hub id (same weights, another name).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from engine import Engine, GenerationParams, Message, Mode
from engine.config import load_settings
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FOLDER_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
GREEDY = GenerationParams(max_new_tokens=4, temperature=0)


def copy_templates(dst: Path) -> Path:
    shutil.copytree(ROOT / "templates", dst)
    return dst


def copy_adapters(dst: Path, domains: tuple[str, ...] = ("legal",)) -> Path:
    dst.mkdir(parents=True)
    for domain in domains:
        shutil.copytree(ROOT / "adapters" / domain / "v1", dst / domain / "v1")
        (dst / domain / "current").write_text("v1\n")
    return dst


# ---- refused at start, before the model loads ------------------------------------------------

@pytest.mark.parametrize("missing", ["TEMPLATES_DIR", "ADAPTERS_DIR"])
async def test_a_missing_folder_stops_the_start_naming_the_setting(tmp_path: Path, missing: str) -> None:
    templates = copy_templates(tmp_path / "templates")
    adapters = copy_adapters(tmp_path / "adapters")
    gone = {"TEMPLATES_DIR": templates, "ADAPTERS_DIR": adapters}[missing]
    shutil.rmtree(gone)
    engine = Engine(load_settings(templates_dir=templates, adapters_dir=adapters, model_cache_dir=ROOT / "models"))
    with pytest.raises(ConfigError) as err:
        await engine.start()
    assert missing in str(err.value) and str(gone) in str(err.value) and "does not exist" in str(err.value)
    assert engine.loaded is None  # refused before loading the model
    assert not engine.status().ready


async def test_starting_from_another_working_directory_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the defaults are the relative paths "templates" and "adapters"
    engine = Engine(load_settings(model_cache_dir=ROOT / "models"))
    with pytest.raises(ConfigError) as err:
        await engine.start()
    msg = str(err.value)
    assert "TEMPLATES_DIR='templates'" in msg and "ADAPTERS_DIR='adapters'" in msg
    assert f"working directory {tmp_path}" in msg
    assert str(ROOT / "templates") in msg  # where the project's own folder is


@pytest.mark.parametrize("case", ["empty", "all-broken"])
async def test_templates_that_cannot_render_any_role_stop_the_start(tmp_path: Path, case: str) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    if case == "all-broken":
        (templates / "assistant.en.j2").write_text("{% if %}", encoding="utf-8")
        (templates / "lawyer.ru.j2").write_text("{{ nope }}", encoding="utf-8")
    engine = Engine(load_settings(templates_dir=templates, adapters_dir=copy_adapters(tmp_path / "adapters"),
                                  model_cache_dir=ROOT / "models"))
    with pytest.raises(ConfigError, match="TEMPLATES_DIR") as err:
        await engine.start()
    if case == "all-broken":
        assert "assistant.en.j2" in str(err.value) and "lawyer.ru.j2" in str(err.value)
    assert engine.loaded is None


# ---- the running engine (real model) --------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("start")
    copy_templates(root / "templates")
    copy_adapters(root / "adapters", ("legal",))
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(workdir: Path):
    settings = load_settings(
        model=str(FOLDER_MODEL), adapters_dir=workdir / "adapters", templates_dir=workdir / "templates",
        model_cache_dir=ROOT / "models", template_poll_s=0.05, template_render_timeout_s=1.0,
        history_tokens=64, quantization="none",
    )
    eng = Engine(settings)
    await eng.start()
    yield eng
    await eng.close()


async def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)




@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_the_converted_folder_serves_the_adapters_trained_under_the_hub_id(engine: Engine) -> None:
    assert engine.status().model == "SmolLM2-135M-Instruct"
    assert engine.registry.serving() == {"legal": "v1"}
    stream = engine.generate([Message("user", "Can my landlord keep my deposit?")], Mode("legal", "lawyer"), GREEDY)
    assert "".join([p async for p in stream]) and stream.result.adapter_version == "v1"


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_not_ready_while_no_role_can_be_rendered(engine: Engine, workdir: Path) -> None:
    templates = workdir / "templates"
    aside = workdir / "templates-aside"
    assert engine.status().ready and engine.status().problems == ()
    templates.rename(aside)
    try:
        await wait_until(lambda: not engine.status().ready)  # the poller notices; nobody has to ask
        status = engine.status()
        assert "TEMPLATES_DIR" in status.problems[0] and "no role template" in status.problems[0]
        assert engine.modes().roles == ()
    finally:
        aside.rename(templates)
    await wait_until(lambda: engine.status().ready)
    assert engine.status().problems == ()


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_a_slow_template_renders_off_the_event_loop(engine: Engine, workdir: Path, caplog) -> None:
    """Eve's prompt takes the whole render budget (1 s); the event loop keeps running meanwhile,
    and she is answered with the safe prompt instead of stalling everyone."""
    (workdir / "templates" / "slowpoke.en.j2").write_text(
        "You help.{% if first_name == 'Eve' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}", encoding="utf-8")
    await wait_until(lambda: engine.modes().role("slowpoke") is not None)
    from engine.types import UserContext

    ticks: list[int] = []
    render_done: list[int] = []

    class Marker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "slowpoke.en.j2" in record.getMessage():
                render_done.append(len(ticks))

    marker = Marker(level=logging.ERROR)
    logging.getLogger("engine.prompts").addHandler(marker)
    try:
        stream = engine.generate([Message("user", "hello")], Mode(None, "slowpoke"), GREEDY,
                                 user=UserContext(first_name="Eve"))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the stream starts; with rendering on the loop it would finish it here
        while not first.done():
            ticks.append(1)
            await asyncio.sleep(0.01)
        assert await first
        async for _ in stream:
            pass
    finally:
        logging.getLogger("engine.prompts").removeHandler(marker)
    assert render_done and render_done[0] > 0, "the event loop did not run while the template rendered"


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_history_tokens_keep_a_long_paste_out_of_later_prompts(engine: Engine) -> None:
    paste = "Please review this contract: " + "clause " * 600
    history = [Message("user", paste), Message("assistant", "It looks fine."),
               Message("user", "And the deposit?")]
    stream = engine.generate(history, Mode(None, "assistant"), GREEDY)
    async for _ in stream:
        pass
    assert stream.result.trimmed_turns == 2 and stream.result.prompt_tokens < 200


@pytest.mark.model
async def test_an_empty_adapters_folder_serves_the_base_model_and_says_so(tmp_path: Path, caplog) -> None:
    (tmp_path / "adapters").mkdir()
    settings = load_settings(
        model=str(FOLDER_MODEL), adapters_dir=tmp_path / "adapters", templates_dir=copy_templates(tmp_path / "t"),
        model_cache_dir=ROOT / "models", quantization="none",
    )
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        async with Engine(settings) as engine:
            assert engine.status().ready and engine.registry.serving() == {}
            stream = engine.generate([Message("user", "hi")], Mode(None, "assistant"), GREEDY)
            assert "".join([p async for p in stream])
    assert any("ADAPTERS_DIR" in r.getMessage() and "base model only" in r.getMessage() for r in caplog.records)


@pytest.mark.model
def test_the_model_loader_gives_torch_the_configured_cpu_threads(tmp_path: Path) -> None:
    import torch

    from engine import model as model_loader

    before = torch.get_num_threads()
    try:
        for threads in (2, 1):  # whatever torch had before, the setting is what the forward pass gets
            torch.set_num_threads(3 - threads)
            model_loader.load(load_settings(model=str(FOLDER_MODEL), model_cache_dir=ROOT / "models", device="cpu",
                                            quantization="none", cpu_threads=threads))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
