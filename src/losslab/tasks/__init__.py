"""Tasks: what differs between kinds of experiment, behind one training loop.

:class:`Task` is a contract (an abstract base) that every kind implements in full; the kinds are
peers and none inherits another's data or step. A task builds what the pipelines ask of it, so that
they never branch on the kind: its cache (:meth:`Task.build_cache`), a fold's loaders, loss, model and
step (:meth:`Task.setup_fold`), the step of a loss (:meth:`Task.step`: batch → forward → loss,
validation outputs and metrics, the part the engine's loop calls; the loop owns time), the registry
spec and the model back from it (:meth:`Task.spec`, :func:`build_from_spec`), the model of a run
(:meth:`Task.rebuild`), the held-out test loader and the figures of a fit (:meth:`Task.epoch_figures`).
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

from losslab.tasks.base import (CaseCacheMixin, FoldSetup, Task, TaskError, build_from_spec, build_task_model,
                                check_task, get_task, list_tasks, loss_tasks_of, register_task, task_name, task_of,
                                task_of_kind)
from losslab.tasks.classification import (BagClassificationTask, BagStep, ClassificationTask, ImageClassificationTask,
                                          ImageStep, VolumeClassificationTask, classification_figures)
from losslab.tasks.multitask import MultitaskStep, MultitaskTask
from losslab.tasks.segmentation import SegmentationStep, SegmentationTask, plot_segmentation_overlay

__all__ = ["BagClassificationTask", "BagStep", "CaseCacheMixin", "ClassificationTask", "FoldSetup",
           "ImageClassificationTask", "ImageStep", "MultitaskStep", "MultitaskTask", "SegmentationStep",
           "SegmentationTask", "Task", "TaskError", "VolumeClassificationTask", "build_from_spec", "build_task_model",
           "check_task", "classification_figures", "get_task", "list_tasks", "loss_tasks_of",
           "plot_segmentation_overlay", "register_task", "task_name", "task_of", "task_of_kind"]
