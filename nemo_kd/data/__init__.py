"""Datasets, tokenisation, masks. :mod:`nemo_kd.data.records` reads and validates raw samples."""

from nemo_kd.data.records import (
    ALLOWED_ROLES,
    ROLE_CHOSEN,
    ROLE_REJECTED,
    ROLE_SINGLE,
    DataError,
    Record,
    RecordSet,
    SkippedSample,
    read_records,
    records_from_objects,
)

__all__ = [
    "ALLOWED_ROLES",
    "DataError",
    "ROLE_CHOSEN",
    "ROLE_REJECTED",
    "ROLE_SINGLE",
    "Record",
    "RecordSet",
    "SkippedSample",
    "read_records",
    "records_from_objects",
]
