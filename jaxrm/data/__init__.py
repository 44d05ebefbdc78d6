"""Preference data: records and their validation, readers, tokenisation, and a synthetic source.

Reading and tokenising need only NumPy here; ``datasets``, ``pyarrow``, ``tokenizers`` and
``transformers`` are imported by the functions that use them.
"""

from jaxrm.data.readers import ReadReport, read_records
from jaxrm.data.records import (
    RATING_LEVELS,
    DataError,
    DataWarning,
    Message,
    PairRecord,
    RankedRecord,
    Record,
    TieRecord,
    normalize_rating,
    parse_record,
    ranks_from_scores,
)
from jaxrm.data.stats import rankdata, spearman
from jaxrm.data.synthetic import SyntheticTask, write_jsonl
from jaxrm.data.tokenize import SpecialTokens, TokenizedExample, TokenizeReport, special_tokens, tokenize_records

__all__ = [
    "RATING_LEVELS",
    "DataError",
    "DataWarning",
    "Message",
    "PairRecord",
    "RankedRecord",
    "ReadReport",
    "Record",
    "SpecialTokens",
    "SyntheticTask",
    "TieRecord",
    "TokenizeReport",
    "TokenizedExample",
    "normalize_rating",
    "parse_record",
    "rankdata",
    "ranks_from_scores",
    "read_records",
    "spearman",
    "special_tokens",
    "tokenize_records",
    "write_jsonl",
]
