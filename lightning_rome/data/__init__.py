"""DataModules for COUNTERFACT, zsRE and known facts, their record types, and the tokenized
training batches of the hypernetwork editors (MEND, KE)."""

from lightning_rome.data.base import EditCaseDataModule, RecordDataModule, RecordDataset
from lightning_rome.data.batches import (
    IGNORE_INDEX,
    EditTrainingBatch,
    EditTrainingCollator,
    LabeledBatch,
    labeled_batch,
)
from lightning_rome.data.counterfact import (
    COUNTERFACT_URL,
    MULTI_COUNTERFACT_URL,
    CounterFactDataModule,
)
from lightning_rome.data.known import KNOWN_FACTS_URL, KnownFactsDataModule
from lightning_rome.data.parsing import (
    parse_counterfact_record,
    parse_known_fact,
    parse_records,
    parse_zsre_record,
)
from lightning_rome.data.sources import SplitSpec, load_json_records, parse_split
from lightning_rome.data.text import (
    NAMED_CORPORA,
    HFTextCorpus,
    IterableTextCorpus,
    TextCorpus,
    TextCorpusDataModule,
    TextFileCorpus,
    as_corpus,
    collate_rows,
    is_heading,
)
from lightning_rome.data.zsre import ZSRE_URL, ZsREDataModule
from lightning_rome.records import (
    EditCase,
    KnownFact,
    MalformedRecordError,
    MalformedRecordWarning,
    RecordBatch,
    collate_records,
)

__all__ = [
    "COUNTERFACT_URL",
    "IGNORE_INDEX",
    "KNOWN_FACTS_URL",
    "MULTI_COUNTERFACT_URL",
    "NAMED_CORPORA",
    "ZSRE_URL",
    "CounterFactDataModule",
    "EditCase",
    "EditCaseDataModule",
    "EditTrainingBatch",
    "EditTrainingCollator",
    "HFTextCorpus",
    "IterableTextCorpus",
    "KnownFact",
    "KnownFactsDataModule",
    "LabeledBatch",
    "MalformedRecordError",
    "MalformedRecordWarning",
    "RecordBatch",
    "RecordDataModule",
    "RecordDataset",
    "SplitSpec",
    "TextCorpus",
    "TextCorpusDataModule",
    "TextFileCorpus",
    "ZsREDataModule",
    "as_corpus",
    "collate_records",
    "collate_rows",
    "is_heading",
    "labeled_batch",
    "load_json_records",
    "parse_counterfact_record",
    "parse_known_fact",
    "parse_records",
    "parse_split",
    "parse_zsre_record",
]
