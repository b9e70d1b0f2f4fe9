"""Data: tfds array_record sources, a grain pipeline, pp ops, embedded digits.

Importing this package registers the `vitjax_digits` tfds builder, so
`tfds.data_source("vitjax_digits")` works (and builds it on first use).
"""

from vitjax.data import pp
from vitjax.data.digits import VitjaxDigits
from vitjax.data.digits import prepare as prepare_digits
from vitjax.data.pipeline import DataInfo
from vitjax.data.pipeline import DatasetNotPreparedError
from vitjax.data.pipeline import data_source
from vitjax.data.pipeline import get_info
from vitjax.data.pipeline import local_batch_size
from vitjax.data.pipeline import make_eval_batches
from vitjax.data.pipeline import make_train_loader
from vitjax.data.pipeline import num_classes
from vitjax.data.pipeline import num_eval_batches
from vitjax.data.pipeline import num_examples
from vitjax.data import augment  # registers the DeiT pp ops (randaugment, random_erasing)

__all__ = [
    "augment",
    "DataInfo",
    "DatasetNotPreparedError",
    "VitjaxDigits",
    "data_source",
    "get_info",
    "local_batch_size",
    "make_eval_batches",
    "make_train_loader",
    "num_classes",
    "num_eval_batches",
    "num_examples",
    "pp",
    "prepare_digits",
]
