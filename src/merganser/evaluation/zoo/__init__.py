"""The offline model zoo: tiny Llama models trained locally on synthetic tasks."""

from merganser.evaluation.zoo.build import ZooSpec, build_zoo
from merganser.evaluation.zoo.tasks import ALL_TASKS, EXPERT_TASKS, PRETRAIN_TASKS, Task, get_task

__all__ = [
    "ALL_TASKS",
    "EXPERT_TASKS",
    "PRETRAIN_TASKS",
    "Task",
    "ZooSpec",
    "build_zoo",
    "get_task",
]
