"""Source mappings (conf/sources/NAME.yaml) and reading input files into raw records.

A mapping declares, per canonical field, which input column fills it (dots address nested
JSON or Parquet fields), a constant, a timestamp format, a value map and whether the value is
personal data. Reading produces one row per input record with its file, line and raw text,
so that every record can be accounted for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ValidationError, field_validator, model_validator
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core.config import ConfigError, Strict, describe_validation_error
from microseg.core.schemas import MAPPABLE_FIELDS, REQUIRED_FIELDS, USER_KEY_FIELDS

TIMESTAMP_FORMATS = ("iso8601", "epoch_seconds", "epoch_millis")


class FieldMapping(Strict):
    column: str | None = None
    value: str | int | float | bool | None = None
    format: str | None = None
    values: dict[str, str] | None = None
    personal: bool = False

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"column": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.column is None) == (self.value is None):
            raise ValueError("give exactly one of `column` or `value`")
        return self


class CsvOptions(Strict):
    columns: tuple[str, ...]
    header: bool = True
    delimiter: str = ","
    quote: str = '"'

    @field_validator("delimiter", "quote")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1:
            raise ValueError("must be a single character")
        return v


class SourceMapping(Strict):
    name: str
    description: str = ""
    format: Literal["json", "csv", "parquet"]
    csv: CsvOptions | None = None
    fields: dict[str, FieldMapping]
    properties: dict[str, FieldMapping] = {}

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.fields) - set(MAPPABLE_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown canonical field(s) {unknown} under `fields` "
                f"(known: {list(MAPPABLE_FIELDS)})"
            )
        missing = [f for f in REQUIRED_FIELDS if f not in self.fields]
        if missing:
            raise ValueError(f"`fields` must map {missing}")
        if not any(f in self.fields for f in USER_KEY_FIELDS):
            raise ValueError(f"`fields` must map at least one of {list(USER_KEY_FIELDS)}")
        for name, mapping in self.fields.items():
            if mapping.format is not None and name != "event_time":
                raise ValueError(f"fields.{name}: `format` applies to event_time only")
        if self.format == "csv":
            if self.csv is None:
                raise ValueError("a csv source needs a `csv:` section with its `columns`")
            known = set(self.csv.columns)
            for name, mapping in self.all_mappings().items():
                if mapping.column is not None and mapping.column not in known:
                    raise ValueError(f"{name}: column '{mapping.column}' is not in csv.columns")
        return self

    def all_mappings(self) -> dict[str, FieldMapping]:
        return {
            **{f"fields.{k}": v for k, v in self.fields.items()},
            **{f"properties.{k}": v for k, v in self.properties.items()},
        }

    def input_columns(self) -> list[str]:
        """Input column paths referenced by the mapping, in a stable order."""
        return sorted({m.column for m in self.all_mappings().values() if m.column is not None})

    def personal_fields(self) -> list[str]:
        return [name for name, m in self.all_mappings().items() if m.personal]


def load_source(sources_dir: str | Path, name: str) -> SourceMapping:
    """Load and validate conf/sources/NAME.yaml; errors name the file and the key."""
    path = Path(sources_dir) / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not path.is_file():
        available = sorted(p.stem for p in Path(sources_dir).glob("*.yaml"))
        raise ConfigError(f"unknown source '{name}': no {path} (available: {', '.join(available)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    try:
        mapping = SourceMapping.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, {(): str(path)})) from exc
    if mapping.name != name:
        raise ConfigError(f"{path}: key 'name' is '{mapping.name}' but the file is for '{name}'")
    return mapping


def input_col(index: int) -> str:
    """Internal name of the string column holding input_columns()[index]."""
    return f"_in{index}"


# --------------------------------------------------------------------------------------
# listing input files


@dataclass(frozen=True)
class InputFile:
    path: str  # fully qualified Hadoop path, as readers take it and tables record it
    uri: str  # the same, URI-encoded, as Spark's _metadata.file_path gives it
    size: int
    modified_at: datetime


def list_input_files(spark: SparkSession, path: str) -> list[InputFile]:
    """Files under a file, folder (recursively) or glob, skipping hidden and `_` files."""
    jvm = spark.sparkContext._jvm
    if "://" not in path and not path.startswith("file:"):
        path = os.path.abspath(path)  # Hadoop does not collapse ".." in relative paths
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    statuses = fs.globStatus(hadoop_path)
    if not statuses:
        raise FileNotFoundError(f"no input files at {path}")
    found: list[InputFile] = []

    def add(status) -> None:
        name = status.getPath().getName()
        if not name.startswith((".", "_")):
            qualified = fs.makeQualified(status.getPath())
            found.append(
                InputFile(
                    qualified.toString(),
                    re.sub(r"^file:///", "file:/", qualified.toUri().toString()),
                    status.getLen(),
                    datetime.fromtimestamp(status.getModificationTime() / 1000, timezone.utc),
                )
            )

    for status in statuses:
        if status.isDirectory():
            files = fs.listFiles(status.getPath(), True)
            while files.hasNext():
                file_status = files.next()
                parent = file_status.getPath().getParent().toUri().getPath()
                if not any(part.startswith((".", "_")) for part in parent.split("/")):
                    add(file_status)
        else:
            add(status)
    return sorted(found, key=lambda f: f.path)


# --------------------------------------------------------------------------------------
# reading raw records


def _raw_lines(spark: SparkSession, files: list[str]) -> DataFrame:
    return spark.read.text(files).select(
        F.regexp_replace("value", "\r$", "").alias("raw"),
        F.col("_metadata.file_path").alias("source_file"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_row_id"),
    )


def _numbered(lines_df: DataFrame) -> DataFrame:
    """Text lines with their file and 1-based line number, without a global sort.

    Each file split is read by one task in order, so a line's number is its position in its
    split plus the number of lines in the file's earlier splits.
    """
    blocks_df = lines_df.groupBy("source_file", "_block").agg(
        F.min("_row_id").alias("_first_row_id"), F.count(F.lit(1)).alias("_lines")
    )
    earlier = (
        Window.partitionBy("source_file")
        .orderBy("_block")
        .rowsBetween(Window.unboundedPreceding, -1)
    )
    blocks_df = blocks_df.withColumn("_offset", F.coalesce(F.sum("_lines").over(earlier), F.lit(0)))
    return lines_df.join(F.broadcast(blocks_df), ["source_file", "_block"], how="inner").select(
        "source_file",
        (F.col("_row_id") - F.col("_first_row_id") + F.col("_offset") + 1).alias("source_line"),
        "raw",
    )


def _json_records(lines_df: DataFrame, mapping: SourceMapping) -> DataFrame:
    paths = mapping.input_columns()
    top_level = sorted({p.split(".", 1)[0] for p in paths})
    schema = T.StructType(
        [T.StructField(name, T.StringType()) for name in top_level]
        + [T.StructField("_corrupt_record", T.StringType())]
    )
    parsed = F.from_json("raw", schema, {"columnNameOfCorruptRecord": "_corrupt_record"})
    df = lines_df.withColumn("_parsed", parsed)
    extracted = []
    for i, path in enumerate(paths):
        top, _, rest = path.partition(".")
        value = F.col("_parsed")[top]
        if rest:
            value = F.get_json_object(value, f"$.{rest}")
        extracted.append(value.alias(input_col(i)))
    malformed = F.when(
        F.col("_parsed").isNull() | F.col("_parsed._corrupt_record").isNotNull(),
        F.lit("not a valid JSON object"),
    ).when(~_one_json_value(F.col("raw")), F.lit("text after the JSON object"))
    return df.select("source_file", "source_line", "raw", malformed.alias("malformed"), *extracted)


# The JSON parser stops after the first value of a text (it reads `{"a": 1} xyz` as {"a": 1}):
# so the record is put in an array before this marker, and the array must have exactly two
# elements, the second this marker.
_END = "microseg:end-of-record:7f3c9a"


def _one_json_value(raw: Column) -> Column:
    """True where `raw` is one JSON value and nothing after it (whitespace aside)."""
    wrapped = F.concat(F.lit("["), raw, F.lit(f',"{_END}"]'))
    return F.coalesce(
        (F.json_array_length(wrapped) == 2) & (F.get_json_object(wrapped, "$[1]") == _END),
        F.lit(False),
    )


def _csv_records(lines_df: DataFrame, mapping: SourceMapping) -> DataFrame:
    csv = mapping.csv
    assert csv is not None
    ddl = ", ".join(f"`c{i}` STRING" for i in range(len(csv.columns)))
    options = {"sep": csv.delimiter, "quote": csv.quote, "escape": csv.quote, "mode": "PERMISSIVE"}
    q, sep = re.escape(csv.quote), re.escape(csv.delimiter)
    unquoted = F.regexp_replace("raw", f"{q}(?:[^{q}]|{q}{q})*{q}", "")
    fields_found = F.size(F.split(unquoted, sep, -1))
    expected = len(csv.columns)
    malformed = F.when(
        F.instr(unquoted, csv.quote) > 0,
        F.lit("unbalanced quotes"),
    ).when(
        fields_found != expected,
        F.format_string(f"expected {expected} columns, found %d", fields_found),
    )
    position = {name: i for i, name in enumerate(csv.columns)}
    df = lines_df.withColumn("_parsed", F.from_csv("raw", ddl, options))
    extracted = [
        F.col("_parsed")[f"c{position[path]}"].alias(input_col(i))
        for i, path in enumerate(mapping.input_columns())
    ]
    return df.select("source_file", "source_line", "raw", malformed.alias("malformed"), *extracted)


def _check_csv_headers(lines_df: DataFrame, mapping: SourceMapping) -> None:
    """Fail on the first file whose header is not the declared one (reads first splits only)."""
    csv = mapping.csv
    assert csv is not None
    expected = csv.delimiter.join(csv.columns)
    bad = (
        lines_df.filter(F.col("_block") == 0)
        .groupBy("source_file")
        .agg(F.min_by("raw", "_row_id").alias("header"))
        .withColumn("header", F.regexp_replace("header", "^\ufeff", ""))
        .filter(F.col("header") != expected)
        .orderBy("source_file")
        .first()
    )
    if bad is not None:
        raise SourceFormatError(
            f"{bad.source_file}: header '{bad.header}' differs from the columns declared by "
            f"source '{mapping.name}': '{expected}'"
        )


def _parquet_records(spark: SparkSession, files: list[str], mapping: SourceMapping) -> DataFrame:
    df = spark.read.option("mergeSchema", "true").parquet(*files)
    data_columns = [F.col(f"`{name}`") for name in df.columns]
    extracted = []
    for i, path in enumerate(mapping.input_columns()):
        try:
            df.select(F.col(path))
        except Exception as exc:  # AnalysisException: name the column and the files
            raise SourceFormatError(
                f"source '{mapping.name}': column '{path}' not found in the Parquet files"
            ) from exc
        extracted.append(F.col(path).cast("string").alias(input_col(i)))
    return df.select(
        F.col("_metadata.file_path").alias("source_file"),
        (F.col("_metadata.row_index") + 1).alias("source_line"),
        F.to_json(F.struct(*data_columns)).alias("raw"),
        F.lit(None).cast("string").alias("malformed"),
        *extracted,
    )


class SourceFormatError(Exception):
    """An input file does not have the shape its source mapping declares."""


def read_records(
    spark: SparkSession, mapping: SourceMapping, inputs: list[InputFile], fmt: str | None = None
) -> DataFrame:
    """One row per input record: source_file, source_line, raw, malformed, then _inN strings.

    Blank lines of text files are not records; `malformed` holds why a record could not be
    parsed, or null. source_file is the path as listed (not URI-encoded).
    """
    records_df = _read_records(spark, mapping, [f.path for f in inputs], fmt)
    paths_df = spark.createDataFrame(
        [(f.uri, f.path) for f in inputs], "source_uri string, source_path string"
    )
    return records_df.join(
        F.broadcast(paths_df), records_df.source_file == paths_df.source_uri, how="left"
    ).select(
        F.coalesce("source_path", "source_file").alias("source_file"),
        *[c for c in records_df.columns if c != "source_file"],
    )


def _read_records(
    spark: SparkSession, mapping: SourceMapping, files: list[str], fmt: str | None
) -> DataFrame:
    fmt = fmt or mapping.format
    if fmt == "parquet":
        return _parquet_records(spark, files, mapping)
    if fmt == "csv" and mapping.csv is None:
        raise SourceFormatError(f"source '{mapping.name}' declares no csv columns")
    raw_lines_df = _raw_lines(spark, files)
    lines_df = _numbered(raw_lines_df)
    if fmt == "csv" and mapping.csv.header:
        _check_csv_headers(raw_lines_df, mapping)
        lines_df = lines_df.filter(F.col("source_line") > 1)
    lines_df = lines_df.filter(F.trim("raw") != "")
    return records_of_lines(lines_df, mapping, fmt)


def records_of_lines(
    lines_df: DataFrame, mapping: SourceMapping, fmt: str | None = None
) -> DataFrame:
    """read_records' rows from text records that are already apart (source_file, source_line,
    raw): lines of a file, or the values of Kafka records."""
    fmt = fmt or mapping.format
    if fmt == "csv":
        if mapping.csv is None:
            raise SourceFormatError(f"source '{mapping.name}' declares no csv columns")
        return _csv_records(lines_df, mapping)
    if fmt != "json":
        raise SourceFormatError(f"source '{mapping.name}': {fmt} records are not text lines")
    return _json_records(lines_df, mapping)


def column_for(mapping: FieldMapping, index_of: dict[str, int]) -> Column:
    """The raw string value a field mapping yields: trimmed, empty as null."""
    if mapping.column is not None:
        value = F.col(input_col(index_of[mapping.column]))
    else:
        value = F.lit(
            str(mapping.value).lower() if isinstance(mapping.value, bool) else str(mapping.value)
        )
    value = F.trim(value)
    return F.when(value != "", value)
