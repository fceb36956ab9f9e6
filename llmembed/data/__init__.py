"""Training data: the shared record schema, readers, batch sampling and collation."""

from llmembed.data.schema import DataError, Record, parse_record
from llmembed.data.readers import read_jsonl

__all__ = ["DataError", "Record", "parse_record", "read_jsonl"]
