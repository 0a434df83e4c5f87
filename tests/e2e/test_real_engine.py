"""The bot on the real engine and the real default model (SmolLM2-135M; QUANTIZATION=auto, so fp32 on CPU), over the fake Bot API.

The `legal` adapter is a small random LoRA written in the
documented on-disk layout under tmp_path (v1 serving, and v2, its lora_B tripled, a candidate for
/ab), so these tests need neither the shipped adapters nor training. Greedy decoding and a short answer cap keep them to seconds each on a CPU.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("engine.engine", reason="engine/engine.py is not there yet")

from engine import Engine  # noqa: E402
from engine.config import load_settings  # noqa: E402
from engine.adapters.store import AdapterStore  # noqa: E402
from tests.conftest import ADMIN_ID  # noqa: E402
from tests.engine.test_engine_integration import scaled_copy  # noqa: E402
from tests.fakes.telegram import FakeTelegram  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]


def _write_random_adapter(root: Path, name: str) -> None:
    """adapters/<name>/v1 with peft's files, our meta.json and `current` (docs/engine-api.md)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    version = root / name / "v1"
    peft_model.save_pretrained(version)
    (version / "meta.json").write_text(json.dumps({
        "name": name, "version": "v1", "base_model": MODEL_ID, "status": "promoted", "parent": None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(), "metrics": {}, "training": {"r": 4},
    }))
    (root / name / "current").write_text("v1\n")


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"the default model is not converted at {MODEL_DIR} (run `make model`)")
    root = tmp_path_factory.mktemp("adapters")
    _write_random_adapter(root, "legal")
    scaled_copy(AdapterStore(root), "legal", root / "legal" / "v1", 3.0, {"status": "candidate"})
    return root


@pytest.fixture
async def real_engine(adapters_dir):
    """Per test (a model load is a few seconds): an engine's threads and futures belong to one loop."""
    engine = Engine(load_settings(
        _env_file=None, model_cache_dir=REPO / "models", adapters_dir=adapters_dir,
        templates_dir=REPO / "templates", max_new_tokens=24, temperature=0.0,
    ))
    await engine.start()
    yield engine
    await engine.close()


def _answers(tg: FakeTelegram, chat_id: int = 7) -> list:
    """Final answers: the messages that carry the 👍/👎 feedback buttons (menus have buttons too)."""
    return [m for m in tg.bot_messages(chat_id) if any("👍" in b["text"] for b in m.buttons)]


def _rows(store, role: str = "assistant"):
    return list(store.db["messages"].rows_where("role = ?", [role], order_by="id"))


async def test_a_streamed_answer_from_the_real_model(tg: FakeTelegram, real_engine, start_bot):
    bot = await start_bot(real_engine)
    tg.send_text(7, "What is a contract? Answer in one sentence.")
    await tg.wait_for(lambda: tg.calls_of("sendChatAction", 7), timeout=120)
    final = await tg.wait_for(lambda: next(iter(_answers(tg)), None), timeout=300)
    await tg.wait_for(lambda: len(_rows(bot.store)) == 1)
    stored = _rows(bot.store)
    assert len(stored) == 1 and stored[0]["text"].strip()
    assert stored[0]["finish_reason"] in ("stop", "length")
    assert stored[0]["completion_tokens"] > 0 and stored[0]["prompt_tokens"] > 0
    assert final.text  # what the user sees is the stored answer, rendered
    assert " ".join(final.text.split())[:20] in " ".join(stored[0]["text"].replace("*", "").split())


async def test_switching_mode_changes_the_adapter_that_answers(tg, real_engine, start_bot):
    bot = await start_bot(real_engine)
    tg.send_text(7, "/domain")
    menu = await tg.wait_for_text(7, "Choose a domain adapter")
    tg.press_button(7, menu, "Law")
    await tg.wait_for(lambda: any(b["text"] == "✅ ⚖️ Law" for b in menu.buttons))
    tg.send_text(7, "Can my landlord keep the deposit?")
    await tg.wait_for(lambda: len(_answers(tg)) >= 1, timeout=300)
    tg.send_text(7, "/domain")
    menus = await tg.wait_for(lambda: [m for m in tg.bot_messages(7) if "Choose a domain" in m.text][1:])
    tg.press_button(7, menus[0], "no adapter")
    await tg.wait_for(lambda: any(b["text"] == "✅ no adapter" for b in menus[0].buttons))
    tg.send_text(7, "Can my landlord keep the deposit?")
    await tg.wait_for(lambda: len(_answers(tg)) == 2, timeout=300)
    await tg.wait_for(lambda: len(_rows(bot.store)) == 2)
    legal, base = _rows(bot.store)
    assert (legal["adapter"], legal["adapter_version"]) == ("legal", "v1")
    assert base["adapter"] is None
    assert legal["text"] != base["text"]  # same question, greedy: the adapter made the difference


async def test_restart_keeps_mode_and_history_with_the_real_model(tg, real_engine, start_bot):
    first = await start_bot(real_engine)
    first.store.touch_user(7)
    first.store.set_mode(7, "legal", "lawyer")
    tg.send_text(7, "My name is Ann. What is a will?")
    await tg.wait_for(lambda: len(_answers(tg)) >= 1, timeout=300)
    await first.stop()

    second = await start_bot(real_engine)
    tg.send_text(7, "And who can witness it?")
    await tg.wait_for(lambda: len(_answers(tg)) == 2, timeout=300)
    a1, a2 = _rows(second.store)
    assert (a2["adapter"], a2["template"]) == ("legal", "lawyer")  # the mode survived the restart
    # the follow-up was asked with the first turn in its prompt
    assert a2["prompt_tokens"] > a1["prompt_tokens"] + a1["completion_tokens"]


async def test_an_answer_cut_by_max_new_tokens_is_marked_with_a_continue_button(tg, real_engine, start_bot):
    bot = await start_bot(real_engine)  # MAX_NEW_TOKENS=24: a long story does not fit
    tg.send_text(7, "Tell me a long story about a cat who travels around the world.")
    final = await tg.wait_for(lambda: next(iter(_answers(tg)), None), timeout=300)
    await tg.wait_for(lambda: len(_rows(bot.store)) == 1)
    assert _rows(bot.store)[0]["finish_reason"] == "length"
    assert final.text.endswith("✂️ Cut off at the length limit.")
    assert [b["text"] for b in final.buttons] == ["👍", "👎", "▶ Continue"]


async def test_an_ab_on_the_real_engine_answers_from_both_versions_and_why_tells_which(
    tg, real_engine, start_bot
):
    bot = await start_bot(real_engine, rng=random.Random(0))  # seed 0: serving first, then the candidate
    tg.send_text(ADMIN_ID, "/ab legal 100")
    await tg.wait_for_text(ADMIN_ID, "A/B of legal is running: 100% of its requests take part", timeout=120)
    held = {(a.name, a.version): a.state for a in real_engine.status().adapters}
    assert held == {("legal", "v1"): "ready", ("legal", "v2"): "ready"}  # both resident while it runs
    answers = []
    for user in (7, ADMIN_ID):  # the same first question, greedy: only the version can make them differ
        bot.store.touch_user(user)
        bot.store.set_mode(user, "legal", "lawyer")
        tg.send_text(user, "Can my landlord keep the deposit?", first_name="Ann")
        final = await tg.wait_for(lambda u=user: next(iter(_answers(tg, u)), None), timeout=300)
        stored = await tg.wait_for(lambda u=user, m=final.message_id: bot.store.answer_shown_in(u, m))
        answers.append((final, stored))
    (first, serving), (shown, candidate) = answers
    assert (serving.ab_arm, serving.adapter_version) == ("serving", "v1")
    assert (candidate.ab_arm, candidate.adapter_version) == ("candidate", "v2")
    assert serving.prompt_tokens == candidate.prompt_tokens and first.text != shown.text
    template = hashlib.sha256((REPO / "templates" / "lawyer.en.j2").read_bytes()).hexdigest()
    for record, version in ((serving, "v1"), (candidate, "v2")):
        stamp = record.stamp
        assert (stamp.adapter, stamp.adapter_version, stamp.backend) == ("legal", version, "local")
        assert (stamp.base_model, stamp.base_fingerprint) == (MODEL_ID, real_engine.loaded.fingerprint)
        assert stamp.quantization == real_engine.status().quantization != "auto"  # what QUANTIZATION=auto chose
        assert (stamp.template, stamp.template_language, stamp.template_hash) == ("lawyer", "en", template)
        assert (stamp.sampling.temperature, stamp.sampling.max_new_tokens) == (0.0, 24)
    tg.send_text(ADMIN_ID, "/why", reply_to=shown.message_id)
    why = await tg.wait_for_text(ADMIN_ID, "🔎 Answer #")
    assert "Adapter: legal v2 · A/B #1" in why.text and f"sha256 {template[:12]}" in why.text
    tg.send_text(ADMIN_ID, "/ab legal stop")
    await tg.wait_for_text(ADMIN_ID, "Stopped the A/B test of legal")
    real_engine.registry.wait_idle()
    assert {(a.name, a.version) for a in real_engine.status().adapters} == {("legal", "v1")}
