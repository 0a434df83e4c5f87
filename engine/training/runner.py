"""One training job, start to finish, inside the training process.

QLoRA on the base model exactly as the engine serves it (`engine.model.load`: same weights,
same quantization), LoRA shape from settings, loss on assistant tokens only, trained by
transformers' Trainer. Before and after training the held-out split is scored for the base
model, the current version and the new one; the gate's verdict goes into meta.json.

The job works inside a staging folder from its first step; the folder becomes `vN` by one
rename at the very end. A job that dies anywhere before that leaves only the staging folder,
which the supervisor (or the next job) removes: a version exists completely or not at all.
This module never moves `current`: promotion belongs to whoever can also hot-load it.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from engine.adapters.store import AdapterStore, VersionDir
from engine.config import EngineSettings
from engine.errors import TrainingError
from engine.training.data import DomainData, load_domain_data, load_hub_data
from engine.training.evaluate import EvalResult, eval_loss, gate
from engine.training.options import TrainOptions
from engine.training.promotion import check_compatible
from engine.types import TrainingEvent

log = logging.getLogger(__name__)

Emit = Callable[[TrainingEvent], None]


def load_data(store: AdapterStore, domain: str, options: TrainOptions) -> DomainData:
    if options.dataset:
        return load_hub_data(options.dataset)
    return load_domain_data(store.domain_dir(domain) / "data")


def lora_config(settings: EngineSettings) -> Any:
    from peft import LoraConfig

    target = settings.lora_target_modules.strip()
    modules: str | list[str] = target if target == "all-linear" else [m.strip() for m in target.split(",") if m.strip()]
    return LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=modules, bias="none", task_type="CAUSAL_LM",
    )


def _progress_callback(emit: Emit, job_id: str, domain: str, message: str) -> Any:
    """A Trainer callback that emits progress events with the loss and an ETA from the mean step time."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        started = time.monotonic()

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.started = time.monotonic()
            emit(TrainingEvent(job_id, domain, "progress", step=0, total_steps=state.max_steps, message=message))

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                step, total = state.global_step, state.max_steps
                eta = (time.monotonic() - self.started) / step * (total - step) if step else None
                emit(TrainingEvent(job_id, domain, "progress", step=step, total_steps=total,
                                   loss=float(logs["loss"]), eta_s=eta))

    return Progress()


def run_job(
    settings: EngineSettings,
    domain: str,
    options: TrainOptions,
    *,
    emit: Emit,
    job_id: str,
    requested_by: str | None = None,
) -> VersionDir:
    """Train, evaluate and write a new version of `domain` (status "candidate").

    Raises NoTrainingData / AdapterNotFound before any heavy work; TrainingError (or the
    library's exception) when training itself fails.
    """
    wall = time.monotonic()
    store = AdapterStore(settings.adapters_dir)
    store.domain_dir(domain)  # validates the name
    data = load_data(store, domain, options)  # NoTrainingData before any heavy import

    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import PrinterCallback, Trainer

    from engine import model as model_mod
    from engine.training.encoding import collator, encode_dataset

    note = data.bad_summary()
    emit(TrainingEvent(job_id, domain, "started", message=f"loading the model; {note}" if note else "loading the model"))

    torch.manual_seed(options.seed)
    loaded = model_mod.load(settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    model_id = loaded.identity  # the name, carrying the weights' fingerprint
    train_ds, eval_ds = data.datasets()
    train_enc, dropped = encode_dataset(tokenizer, train_ds, options.max_seq_len)
    eval_enc, _ = encode_dataset(tokenizer, eval_ds, options.max_seq_len)
    if len(train_enc) == 0:
        raise TrainingError(f"every training row of {domain} lost its answer to the length cut (max_seq_len={options.max_seq_len}); raise --max-seq-len")

    current = store.current(domain)
    current_dir = _compatible(store, domain, current, model_id)

    if loaded.quantization in ("nf4", "int8"):
        # casts norms/head to fp32 and enables input grads so LoRA on a 4-bit model trains
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora_config(settings))

    def score(label: str) -> EvalResult:
        emit(TrainingEvent(job_id, domain, "evaluating", message=f"evaluating {label} on {len(eval_enc)} held-out rows"))
        result = eval_loss(peft_model, tokenizer, eval_enc, options.eval_batch_size)
        log.info("%s: eval loss %.4f (perplexity %.2f) on %d tokens", label, result.loss, result.perplexity, result.tokens)
        return result

    total_steps = planned_steps(options, len(train_enc))
    with store.staging(domain) as staged:
        scratch = staged / ".trainer"
        progress = _progress_callback(emit, job_id, domain, f"training on {len(train_enc)} rows")
        args = training_arguments(options, loaded, scratch, total_steps)
        trainer = Trainer(model=peft_model, args=args, train_dataset=train_enc,
                          data_collator=collator(tokenizer), callbacks=[progress])
        trainer.remove_callback(PrinterCallback)  # progress goes through our events, not print()
        started = time.monotonic()
        output = trainer.train()
        train_seconds = time.monotonic() - started
        if is_untrained(peft_model):
            raise TrainingError(
                f"training changed nothing: after {int(output.global_step)} step(s) at learning rate "
                f"{options.learning_rate:g} the adapter is still its initial no-op; no version was written "
                "(train for more steps or with a higher learning rate)")
        new, base, previous = _score_all(peft_model, score, current, current_dir)
        decision = gate(new.loss, base.loss, (current, previous.loss) if previous and current else None)
        log.info("gate: %s", decision.reason)

        _save_adapter(peft_model, staged, scratch)
        meta = _version_meta(settings, options, loaded, model_id, data, decision, output, trainer,
                             scores=(new, base, previous), parent=current if current_dir is not None else None,
                             samples=(len(train_enc), len(eval_enc), dropped), seconds=(train_seconds, wall),
                             job=(job_id, requested_by))
        version = store.commit(domain, staged, meta)
    log.info("wrote %s/%s: %s", domain, version.version, decision.reason)
    emit(TrainingEvent(job_id, domain, "finished", step=int(output.global_step),
                       total_steps=int(output.global_step), loss=float(output.training_loss),
                       message=f"{decision.reason}; {note}" if note else decision.reason,
                       metrics=dict(meta["metrics"]), version=version.version))
    return version


def planned_steps(options: TrainOptions, rows: int) -> int:
    """Optimizer steps the Trainer will take (max_steps, else epochs over the rows)."""
    if options.max_steps:
        return options.max_steps
    per_epoch = max(1, math.ceil(rows / options.batch_size) // options.grad_accum)
    return max(1, math.ceil(options.epochs * per_epoch))


def is_untrained(peft_model: Any) -> bool:
    """True while every LoRA B matrix is still zero (peft's initial state): the adapter adds nothing."""
    import torch

    with torch.no_grad():
        return all(not bool(p.any()) for name, p in peft_model.named_parameters() if "lora_B" in name)


def _compatible(store: AdapterStore, domain: str, current: str | None, model_id: Any) -> VersionDir | None:
    """The current version's folder if it can be scored on this base model, else None."""
    if current is None:
        return None
    try:
        return check_compatible(store, domain, current, model_id)
    except Exception as exc:  # a dangling pointer, another base model, no weights
        log.warning("current version %s of %s is unusable (%s); gating against the base model", current, domain, exc)
        return None


def training_arguments(options: TrainOptions, loaded: Any, scratch: Path, total_steps: int) -> Any:
    """transformers' TrainingArguments for one job: our options, the loaded model's device and dtype."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        learning_rate=options.learning_rate,
        # whole steps, rounded down: a short run gets no warm-up (one step of warm-up on a
        # one-step run would train at learning rate 0 and change nothing)
        warmup_steps=int(options.warmup * total_steps),
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=loaded.device == "cpu",
        bf16=loaded.dtype == "bfloat16",
        fp16=loaded.dtype == "float16",
        seed=options.seed,
        data_seed=options.seed,
    )


def _score_all(peft_model: Any, score: Callable[[str], EvalResult], current: str | None,
               current_dir: VersionDir | None) -> tuple[EvalResult, EvalResult, EvalResult | None]:
    """Eval loss of the new adapter, the base model and the serving version (if it is compatible).

    Scoring comes after training on purpose: on CPUs with AVX512-BF16, bitsandbytes repacks
    4-bit weights for inference at the first no-grad eval-mode forward, and the repacked kernel
    has no backward, so scoring first would silently break the gradients that flow through the
    frozen layers.
    """
    new = score("the new adapter")
    with peft_model.disable_adapter():
        base = score("the base model")
    previous: EvalResult | None = None
    if current_dir is not None:
        peft_model.load_adapter(str(current_dir.path), adapter_name="previous")
        peft_model.set_adapter("previous")
        previous = score(f"current version {current}")
        peft_model.set_adapter("default")
        peft_model.delete_adapter("previous")
    return new, base, previous


def _save_adapter(peft_model: Any, staged: Path, scratch: Path) -> None:
    """The adapter's files into the staging folder, readable by a server running as another user."""
    shutil.rmtree(scratch, ignore_errors=True)
    peft_model.save_pretrained(str(staged))
    (staged / "README.md").unlink(missing_ok=True)  # peft's empty model card
    for f in staged.iterdir():  # safetensors writes 0600
        if f.is_file():
            f.chmod(0o644)


def _version_meta(settings: EngineSettings, options: TrainOptions, loaded: Any, model_id: Any, data: Any,
                  decision: Any, output: Any, trainer: Any, *,
                  scores: tuple[EvalResult, EvalResult, EvalResult | None], parent: str | None,
                  samples: tuple[int, int, int], seconds: tuple[float, float],
                  job: tuple[str, str | None]) -> dict[str, Any]:
    """meta.json of the new version: metrics, the gate's decision and how it was trained."""
    new, base, previous = scores
    train_rows, eval_rows, dropped = samples
    train_seconds, wall = seconds
    job_id, requested_by = job
    metrics: dict[str, float] = {
        "eval_loss": new.loss, "eval_perplexity": new.perplexity,
        "eval_loss_base": base.loss, "eval_perplexity_base": base.perplexity,
        "train_loss": float(output.training_loss), "train_seconds": round(train_seconds, 1),
        "job_seconds": round(time.monotonic() - wall, 1),
    }
    if previous is not None:
        metrics.update(eval_loss_previous=previous.loss, eval_perplexity_previous=previous.perplexity)
    return {
        "base_model": str(model_id),
        "base_fingerprint": loaded.fingerprint,
        "status": "candidate",
        "parent": parent,
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "gate": {"passed": decision.passed, "reference": decision.reference,
                 "reference_loss": round(decision.reference_loss, 6), "reason": decision.reason},
        "training": {
            "r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
            "target_modules": settings.lora_target_modules, "quantization": loaded.quantization,
            "steps": int(output.global_step), "epochs": round(float(trainer.state.epoch or 0), 3),
            "samples": train_rows, "eval_samples": eval_rows, "eval_tokens": new.tokens,
            "learning_rate": options.learning_rate, "batch_size": options.batch_size,
            "grad_accum": options.grad_accum, "max_seq_len": options.max_seq_len, "seed": options.seed,
            "skipped_rows": len(data.bad), "dropped_too_long": dropped,
            "eval_from_train": data.eval_from_train, "data": options.dataset or data.files,
            "device": loaded.device, "job_id": job_id, "requested_by": requested_by,
        },
    }
