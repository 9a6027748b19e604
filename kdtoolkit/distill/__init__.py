"""Distillation: losses, schedules, the trainer (checkpoint/resume, DDP), the teacher-output cache."""
