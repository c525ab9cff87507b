"""Tasks: what differs between kinds of experiment, behind one training loop.

A task owns the dataset and collate of its model kind, batch → forward → loss (including a model's
extra outputs), the predictions and its validation diagnostics (:class:`losslab.engine.steps.ClassificationStep`
is the part the engine calls); the loop owns time. It also builds what the pipelines ask of it, so
that they never branch on the kind: its cache (:meth:`Task.build_cache`), a fold's loaders, loss and
model (:meth:`Task.setup_fold`), the registry spec and the model back from it (:meth:`Task.spec`,
:func:`build_from_spec`), the model of a run (:meth:`Task.rebuild`) and the held-out test loader.
One registry, keyed by name:

============================  =====================  =====================================================
task                          model.kind             losses (``task`` of the loss class)
============================  =====================  =====================================================
``bag_classification``        mil, slices25d         classification, ordinal
``image_classification``      image                  classification, ordinal
``volume_classification``     volume3d               classification, ordinal
``multitask``                 multimodal             classification (one head per task; ``losslab distill``)
``segmentation``              segmentation           segmentation
============================  =====================  =====================================================

The experiment names its task with the top-level key ``task``; when absent it is inferred from
``model.kind``. :func:`check_task` refuses an impossible pairing (a segmentation loss on a
classifier, a distillation loss outside ``losslab distill``, an ordinal loss on a segmentation task,
a model kind the task cannot train) when the config is loaded, before any MLflow run opens, naming
the keys and the file that set them.
"""

from losslab.tasks.base import (FoldSetup, Task, TaskError, build_from_spec, build_task_model, check_task, get_task,
                                list_tasks, loss_tasks_of, register_task, task_name, task_of, task_of_kind)
from losslab.tasks.classification import BagClassificationTask, ImageClassificationTask, VolumeClassificationTask
from losslab.tasks.multitask import MultitaskTask
from losslab.tasks.segmentation import SegmentationTask, plot_segmentation_overlay

__all__ = ["BagClassificationTask", "FoldSetup", "ImageClassificationTask", "MultitaskTask",
           "SegmentationTask", "Task", "TaskError", "VolumeClassificationTask", "build_from_spec", "build_task_model",
           "check_task", "get_task", "list_tasks", "loss_tasks_of", "plot_segmentation_overlay", "register_task",
           "task_name", "task_of", "task_of_kind"]
