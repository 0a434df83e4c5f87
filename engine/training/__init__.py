"""Training LoRA adapter versions: data, the training process, jobs, evaluation gate, promotion.

Light to import (no torch): the bot types against `TrainingService` / `TrainingJob`; the
heavy work happens in the training process (`python -m engine.train`, engine/training/runner.py).
"""
from engine.training.jobs import JobRecord, TrainingJob
from engine.training.options import TrainOptions
from engine.training.service import TrainingService

__all__ = ["JobRecord", "TrainOptions", "TrainingJob", "TrainingService"]
