"""Data sources (one module per public layout). Importing a module registers its source."""

from losslab.data.sources.base import (  # noqa: F401
    Case,
    PositiveSize,
    ReadJob,
    SegmentationItem,
    SegmentationSource,
    SkipReport,
    Source,
    SourceKwargsError,
    UnknownSourceError,
    build_source,
    check_source_kwargs,
    default_generator_for,
    default_normalization,
    get_source_class,
    list_generators,
    list_sources,
    register_generator,
    register_source,
    run_generator,
    segmentation_sources,
    source_reads_root,
)

# one import per source module (each registers itself)
from losslab.data.sources import brats  # noqa: F401,E402
from losslab.data.sources import embedded_lumbar  # noqa: F401,E402
from losslab.data.sources import rsna_lumbar  # noqa: F401,E402
from losslab.data.sources import manifest  # noqa: F401,E402
from losslab.data.sources import medmnist  # noqa: F401,E402
from losslab.data.sources import mnist_bags  # noqa: F401,E402
from losslab.data.sources import mnist_digits  # noqa: F401,E402
from losslab.data.sources import msd  # noqa: F401,E402
from losslab.data.sources import embedded_medpix  # noqa: F401,E402
