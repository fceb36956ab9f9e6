"""Training data: the shared record schema, readers, batch sampling and collation."""

from llmembed.data.readers import read_jsonl
from llmembed.data.schema import DataError, Record, parse_record

__all__ = ["DataError", "Record", "parse_record", "read_jsonl"]
