"""Every table's schema, as StructType constants. Writers select exactly these columns, in order."""

from __future__ import annotations

from pyspark.sql import types as T


def _field(name: str, dtype: T.DataType, nullable: bool = True, comment: str = "") -> T.StructField:
    return T.StructField(name, dtype, nullable, {"comment": comment} if comment else {})


STRING = T.StringType()
TIMESTAMP = T.TimestampType()

# Canonical event fields a source mapping can fill, with their types. Order is the table's order.
EVENT_FIELDS: dict[str, tuple[T.DataType, str]] = {
    "event_id": (STRING, "Unique id: the source's own, or a hash of the record's content"),
    "event_time": (TIMESTAMP, "When the event happened, UTC"),
    "event_type": (STRING, "One of ingest.event_types, after the source's value map"),
    "user_id": (STRING, "Known (logged-in) user id; pseudonymized where marked personal"),
    "anonymous_id": (STRING, "Cookie / device id of a visitor not (yet) identified"),
    "product_id": (STRING, "Product or item id"),
    "category": (STRING, "Product category, dotted path where the source has one"),
    "price": (T.DoubleType(), "Unit price in `currency`; never negative"),
    "quantity": (T.IntegerType(), "Units; at least 1 where present"),
    "currency": (STRING, "ISO 4217 code, upper case"),
    "search_query": (STRING, "Search text of a search event"),
    "page_url": (STRING, "Page or screen"),
    "referrer": (STRING, "Referring URL"),
    "device": (STRING, "Device class: mobile, desktop, tablet, app, ..."),
    "country": (STRING, "Country (ISO 3166 alpha-2 where known)"),
    "city": (STRING, "City"),
    "utm_source": (STRING, "Campaign source"),
    "utm_medium": (STRING, "Campaign medium"),
    "utm_campaign": (STRING, "Campaign name"),
    "consent_analytics": (T.BooleanType(), "Visitor consented to analytics"),
    "consent_marketing": (T.BooleanType(), "Visitor consented to marketing use (activation)"),
    "properties": (
        T.MapType(STRING, STRING),
        "Free-form source attributes kept as strings (e.g. brand, site session id)",
    ),
}

# Fields a source may map. event_id is optional (a content hash stands in for it).
MAPPABLE_FIELDS = tuple(name for name in EVENT_FIELDS if name != "properties")
REQUIRED_FIELDS = ("event_time", "event_type")
USER_KEY_FIELDS = ("user_id", "anonymous_id")

_NOT_NULL = {"event_id", "event_time", "event_type"}

EVENTS = T.StructType(
    [
        _field(name, dtype, name not in _NOT_NULL, comment)
        for name, (dtype, comment) in EVENT_FIELDS.items()
    ]
    + [
        _field("event_date", T.DateType(), False, "UTC date of event_time; partition column"),
        _field("source", STRING, False, "Source mapping name"),
        _field("source_file", STRING, False, "File the record came from"),
        _field("source_line", T.LongType(), False, "Line (text) or row (Parquet) number, from 1"),
        _field("ingested_at", TIMESTAMP, False, "Start of the ingest run that added the event"),
        _field("ingest_run_id", STRING, False, "Id of that run"),
    ]
)

QUARANTINE = T.StructType(
    [
        _field("record_id", STRING, False, "Hash of source file and line: one row per bad record"),
        _field("source", STRING, False, "Source mapping name"),
        _field("source_file", STRING, False, "File the record came from"),
        _field("source_line", T.LongType(), True, "Line (text) or row (Parquet) number, from 1"),
        _field("raw", STRING, True, "The record verbatim (Parquet rows as JSON)"),
        _field("reason", STRING, False, "Reason code, see README"),
        _field("message", STRING, False, "What is wrong, naming the field and value"),
        _field("event_id", STRING, True, "The event id where one could be derived"),
        _field("quarantined_at", TIMESTAMP, False, "Start of the ingest run"),
        _field("ingest_run_id", STRING, False, "Id of the ingest run"),
    ]
)

INGESTED_FILES = T.StructType(
    [
        _field("source", STRING, False, "Source mapping name"),
        _field("file_path", STRING, False, "The file, fully qualified"),
        _field("file_size", T.LongType(), False, "Its size in bytes when ingested"),
        _field("file_modified_at", TIMESTAMP, False, "Its modification time when ingested"),
        _field("records", T.LongType(), False, "Records read from the file"),
        _field("events_added", T.LongType(), False, "New events this run added to bronze"),
        _field("already_present", T.LongType(), False, "Events already in bronze from this file"),
        _field("quarantined", T.LongType(), False, "Records in quarantine from this file"),
        _field("ingested_at", TIMESTAMP, False, "Start of the ingest run"),
        _field("ingest_run_id", STRING, False, "Id of the ingest run"),
    ]
)
